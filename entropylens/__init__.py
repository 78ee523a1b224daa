"""entropylens: token-level entropy diagnostics for RL training of language models.

>>> import entropylens as el
>>> el.ingest("sample_logs/vanilla", "store", run="vanilla")  # doctest: +SKIP
>>> el.summary("store").steps                                # doctest: +SKIP
"""

__version__ = "0.1.0"

from . import ingest  # noqa: E402 - the subpackage, callable as the function (el.ingest(...))
from .api import DemoResult, demo, formats, open, summary  # noqa: E402
from .errors import EntropylensError  # noqa: E402
from .store import Store  # noqa: E402

__all__ = ["DemoResult", "EntropylensError", "Store", "demo", "formats", "ingest", "open",
           "summary", "__version__"]

# -- trend analyses: per-step curves, collapse phases, saturation law, covariance, compare --
from .api import (Comparison, Covariance, Performance, Phases, PolicyEntropy,  # noqa: E402
                  RunPhases, SaturationFit, SaturationFits, compare, covariance,
                  fit_saturation, performance, phases, policy_entropy)

__all__ += ["Comparison", "Covariance", "Performance", "Phases", "PolicyEntropy", "RunPhases",
            "SaturationFit", "SaturationFits", "compare", "covariance", "fit_saturation",
            "performance", "phases", "policy_entropy"]
# -- end trend analyses --

# -- token analyses: distributions, forking tokens, data quality --
from .api import (Distribution, Forking, ForkingOverlap, Quality,  # noqa: E402
                  distribution, forking_mask, forking_overlap, forking_tokens, quality)

__all__ += ["Distribution", "Forking", "ForkingOverlap", "Quality", "distribution",
            "forking_mask", "forking_overlap", "forking_tokens", "quality"]
# -- end token analyses --

# -- report: figures, HTML, Markdown and JSON --
# the subpackage, callable as the function: el.report(store, out) and el.report.build_report
from . import report  # noqa: E402

__all__ += ["report"]
# -- end report --

# -- roles: planning versus execution tokens, strategic-gram lexicons --
from .api import (Lexicon, MinedLexicon, PlanningMatch, Roles, load_lexicon,  # noqa: E402
                  match_planning_tokens, mine_lexicon, roles)

__all__ += ["Lexicon", "MinedLexicon", "PlanningMatch", "Roles", "load_lexicon",
            "match_planning_tokens", "mine_lexicon", "roles"]
# -- end roles --

# -- record: rescoring completions with a model, recording generate() (extra [torch]) --
from .api import (RecordResult, RescoreResult, from_hf_generate,  # noqa: E402
                  record_generate, rescore)

__all__ += ["RecordResult", "RescoreResult", "from_hf_generate", "record_generate", "rescore"]
# -- end record --

# -- diagnosis: one status per run --
from .api import Diagnosis, RunDiagnosis, diagnose  # noqa: E402

__all__ += ["Diagnosis", "RunDiagnosis", "diagnose"]
# -- end diagnosis --
# -- diversity: pass@k, best@k, distinct answers, test-time variance, origins --
from .api import (Diversity, DiversityComparison, Origins, diversity,  # noqa: E402
                  diversity_compare, origins)

__all__ += ["Diversity", "DiversityComparison", "Origins", "diversity", "diversity_compare",
            "origins"]
# -- end diversity --
# -- search trees: branch entropy of tree search and graph traversal --
from .api import Branches, RunBranches, branches, tree_nodes  # noqa: E402

__all__ += ["Branches", "RunBranches", "branches", "tree_nodes"]
# -- end search trees --

from .api import watch  # noqa: E402

__all__ += ["watch"]
