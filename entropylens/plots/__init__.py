"""Figures: one function per figure, each takes analysis results and returns the Axes.

Every function takes the data (a DataFrame or result object) first, keyword-only options,
and ``ax=None`` (a new figure when omitted). None computes anything an analysis returns.

>>> import entropylens as el, entropylens.plots as elp
>>> ax = elp.entropy_curve(el.policy_entropy("store", "vanilla"))  # doctest: +SKIP
"""

from .branches import branch_entropy_heatmap, branch_tree, policy_vs_search
from .compare import run_overlay
from .covariance import covariance_groups
from .diversity import diversity_steps, pass_at_k_curves
from .entropy import entropy_curve, quantile_fan
from .forking import forking_tokens_bar
from .origins import origin_steps
from .roles import planning_execution
from .saturation import law_band, saturation_fit

__all__ = ["covariance_groups", "diversity_steps", "entropy_curve", "forking_tokens_bar",
           "law_band", "origin_steps", "pass_at_k_curves", "planning_execution", "quantile_fan",
           "run_overlay", "saturation_fit"]
__all__ += ["branch_entropy_heatmap", "branch_tree", "policy_vs_search"]
