"""The Python API: every CLI command has its function here, and the CLI calls it.

>>> import entropylens as el
>>> store = el.ingest("sample_logs/vanilla", "store", run="vanilla")  # doctest: +SKIP
>>> el.summary("store").steps                                         # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .analysis.summary import Summary, summary
from .errors import EntropylensError
from .ingest import formats, ingest
from .store import Store

__all__ = ["open", "ingest", "formats", "summary", "demo", "DemoResult"]

# -- trend analyses: per-step curves, collapse phases, saturation law, covariance, compare --
from .analysis.compare import Comparison, compare  # noqa: E402
from .analysis.covariance import Covariance, covariance  # noqa: E402
from .analysis.curves import (Performance, PolicyEntropy, performance,  # noqa: E402
                               policy_entropy)
from .analysis.phases import Phases, RunPhases, phases  # noqa: E402
from .analysis.saturation import SaturationFit, SaturationFits, fit_saturation  # noqa: E402

__all__ += ["policy_entropy", "PolicyEntropy", "performance", "Performance", "phases", "Phases",
            "RunPhases", "fit_saturation", "SaturationFit", "SaturationFits", "covariance",
            "Covariance", "compare", "Comparison"]
# -- end trend analyses --

# -- token analyses: distributions, forking tokens, data quality --
from .analysis.distribution import Distribution, distribution  # noqa: E402
from .analysis.forking import Forking, forking_mask, forking_tokens  # noqa: E402
from .analysis.forking_overlap import ForkingOverlap, forking_overlap  # noqa: E402
from .analysis.quality import Quality, quality  # noqa: E402

__all__ += ["distribution", "Distribution", "forking_tokens", "Forking", "forking_overlap",
            "ForkingOverlap", "forking_mask", "quality", "Quality"]
# -- end token analyses --

# -- roles: planning versus execution tokens, strategic-gram lexicons --
from .analysis.lexicon import Lexicon, load_lexicon  # noqa: E402
from .analysis.lexicon_matching import PlanningMatch, match_planning_tokens  # noqa: E402
from .analysis.lexicon_mining import MinedLexicon, mine_lexicon  # noqa: E402
from .analysis.roles import Roles, roles  # noqa: E402

__all__ += ["roles", "Roles", "mine_lexicon", "MinedLexicon", "load_lexicon", "Lexicon",
            "match_planning_tokens", "PlanningMatch"]
# -- end roles --

# -- search trees: branch entropy of tree search and graph traversal --
from .analysis.branches import Branches, RunBranches, branches, tree_nodes  # noqa: E402

__all__ += ["branches", "Branches", "RunBranches", "tree_nodes"]
# -- end search trees --

# -- record: rescoring completions with a model, recording generate() (extra [torch]) --
# torch and transformers are imported only when one of these runs.
from .record import (RecordResult, RescoreResult, from_hf_generate,  # noqa: E402
                     record_generate, rescore)

__all__ += ["rescore", "RescoreResult", "record_generate", "from_hf_generate", "RecordResult"]
# -- end record --


def open(path: str | Path) -> Store:  # noqa: A001 - reads naturally as el.open(...)
    """Open an existing store."""
    return Store.open(path)


@dataclass
class DemoResult:
    """What :func:`demo` produced."""

    store: Store
    summary: Summary
    report_path: Path | None


def demo(*, samples: str | Path = "sample_logs", store: str | Path = "demo_store",
         out: str | Path = "demo_report") -> DemoResult:
    """Ingest every run folder under ``samples`` into ``store``, summarise it and write the
    report into ``out``.

    Each subfolder of ``samples`` becomes a run of the same name (replacing an earlier demo).
    """
    samples = Path(samples)
    if not samples.is_dir():
        raise EntropylensError("sample folder not found (run the demo from the repository "
                               "root or pass --samples)", path=samples)
    folders = sorted(p for p in samples.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EntropylensError("no run folders in the sample folder", path=samples)
    for folder in folders:
        ingest(folder, store, run=folder.name, replace=True)
    opened = Store.open(store)
    written = report(opened, out)
    return DemoResult(store=opened, summary=summary(opened), report_path=written.path)


# -- report: figures, one self-contained HTML page, Markdown and JSON --
def report(store: Store | str | Path, out: str | Path, runs: str | Sequence[str] | None = None,
           *, engine: str = "local", workers: int | None = None,
           title: str = "entropylens report", keep_after_eos: bool = False):
    """Write the diagnostic report of ``runs`` into the folder ``out``.

    Writes ``out/index.html`` (one self-contained page: figures inline, no network, no
    JavaScript), ``out/report.md``, ``out/report.json`` (every number of the page) and
    ``out/figures/*.png``. A section whose analysis cannot run on a run (a metric-only run
    has no forking tokens) says "not available" and why.

    Parameters
    ----------
    store : Store or path
    out : path
        Report folder (created; an earlier report's files are overwritten).
    runs : str or sequence of str, optional
        Default: every run.
    engine : {"local", "ray"}
    workers : int, optional
        Processes of the local engine (default: the usable CPUs up to 4, or
        ``$ENTROPYLENS_WORKERS``).
    title : str
    keep_after_eos : bool
        Keep the tokens after the end of their sequence (padding never sampled) in the token
        analyses; left out by default, counted either way.

    Returns
    -------
    entropylens.report.Report
        ``.path`` is ``index.html``; ``.model`` the content of ``report.json``.
    """
    from .report import build_report

    return build_report(store, out, runs, engine=engine, workers=workers, title=title,
                        keep_after_eos=keep_after_eos)


__all__ += ["report"]
# -- end report --

# -- diagnosis: one status per run --
from .analysis.diagnose import Diagnosis, RunDiagnosis, diagnose  # noqa: E402

__all__ += ["diagnose", "Diagnosis", "RunDiagnosis"]
# -- end diagnosis --
# -- diversity: pass@k, best@k, distinct answers, test-time variance, origins --
from .analysis.diversity import (Diversity, DiversityComparison, diversity,  # noqa: E402
                                 diversity_compare)

from .analysis.origins import Origins, origins  # noqa: E402

__all__ += ["Diversity", "DiversityComparison", "diversity", "diversity_compare", "Origins",
            "origins"]
# -- end diversity --

from .live import watch  # noqa: E402

__all__ += ["watch"]
