"""entropylens: token-level entropy diagnostics for RL training of language models.

>>> import entropylens as el
>>> el.ingest("sample_logs/vanilla", "store", run="vanilla")  # doctest: +SKIP
>>> el.summary("store").steps                                # doctest: +SKIP
"""

from ._version import __version__

# Names load on first use (PEP 562): ``import entropylens`` and the CLI's ``--help`` stay
# cheap, since pandas, scipy and pyarrow are only imported by the analysis that needs them.
#: Subpackages that are also the functions of their name (``el.ingest(...)``).
_SUBPACKAGES = ("ingest", "report")
_ELSEWHERE = {"Store": "store", "EntropylensError": "errors"}


def __getattr__(name: str):
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(f".{_ELSEWHERE[name]}", __name__), name)
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = ["DemoResult", "EntropylensError", "Store", "demo", "formats", "ingest", "open",
           "summary", "__version__"]

# -- trend analyses: per-step curves, collapse phases, saturation law, covariance, compare --
__all__ += ["Comparison", "Covariance", "Performance", "Phases", "PolicyEntropy", "RunPhases",
            "SaturationFit", "SaturationFits", "compare", "covariance", "fit_saturation",
            "performance", "phases", "policy_entropy"]
# -- end trend analyses --

# -- token analyses: distributions, forking tokens, data quality --
__all__ += ["Distribution", "Forking", "ForkingOverlap", "Quality", "distribution",
            "forking_mask", "forking_overlap", "forking_tokens", "quality"]
# -- end token analyses --

# -- report: figures, HTML, Markdown and JSON --
__all__ += ["report"]
# -- end report --

# -- roles: planning versus execution tokens, strategic-gram lexicons --
__all__ += ["Lexicon", "MinedLexicon", "PlanningMatch", "Roles", "load_lexicon",
            "match_planning_tokens", "mine_lexicon", "roles"]
# -- end roles --

# -- record: rescoring completions with a model, recording generate() (extra [torch]) --
__all__ += ["RecordResult", "RescoreResult", "from_hf_generate", "record_generate", "rescore"]
# -- end record --

# -- diagnosis: one status per run --
__all__ += ["Diagnosis", "RunDiagnosis", "diagnose"]
# -- end diagnosis --

# -- diversity: pass@k, best@k, distinct answers, test-time variance, origins --
__all__ += ["Diversity", "DiversityComparison", "Origins", "diversity", "diversity_compare",
            "origins"]
# -- end diversity --

# -- search trees: branch entropy of tree search and graph traversal --
__all__ += ["Branches", "RunBranches", "branches", "tree_nodes"]
# -- end search trees --

# -- watch: live diagnosis of a run while it trains --
__all__ += ["watch"]
# -- end watch --
