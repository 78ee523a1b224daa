"""The figures draw exactly the analysis results they are given."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure

import entropylens as el
from entropylens import plots
from entropylens.base.pieces import decode_tokens, token_label
from entropylens.plots.saturation import law_label


def new_ax():
    return Figure(figsize=(6, 4)).subplots()


def by_gid(artists, gid):
    found = [a for a in artists if a.get_gid() == gid]
    assert len(found) == 1, (gid, [a.get_gid() for a in artists])
    return found[0]


def twin_of(ax):
    others = [a for a in ax.figure.axes if a is not ax and a.bbox.bounds == ax.bbox.bounds]
    assert len(others) == 1
    return others[0]


@pytest.fixture(scope="module")
def vanilla(sample_store):
    return {"curve": el.policy_entropy(sample_store, "vanilla"),
            "performance": el.performance(sample_store, "vanilla"),
            "phases": el.phases(sample_store, "vanilla").runs[0]}


def test_entropy_curve_draws_the_curve_phases_and_performance(vanilla):
    curve, perf, phases = vanilla["curve"], vanilla["performance"], vanilla["phases"]
    ax = plots.entropy_curve(curve, phases=phases.segments, performance=perf,
                             arrival_step=phases.arrival_step, ax=new_ax())
    line = by_gid(ax.lines, "entropy")
    np.testing.assert_array_equal(line.get_xdata(), curve["step"].to_numpy(float))
    np.testing.assert_array_equal(line.get_ydata(), curve["entropy"].to_numpy(float))
    spans = [p for p in ax.patches if str(p.get_gid()).startswith("phase:")]
    assert len(spans) == len(phases.segments) >= 2
    for span, segment in zip(spans, phases.segments.itertuples()):
        assert span.get_gid() == f"phase:{segment.label}"
        assert span.get_x() == segment.start_step
        assert span.get_x() + span.get_width() == segment.end_step
    assert list(by_gid(ax.lines, "arrival").get_xdata()) == [phases.arrival_step] * 2
    perf_line = by_gid(twin_of(ax).lines, "performance")
    np.testing.assert_array_equal(perf_line.get_ydata(), perf["value"].to_numpy(float))
    assert twin_of(ax).get_ylabel() == "val_accuracy"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "policy entropy (exact)" and "rapid collapse" in labels


def test_entropy_curve_alone_on_a_new_figure(vanilla):
    import matplotlib.pyplot as plt

    ax = plots.entropy_curve(vanilla["curve"])
    try:
        assert len(ax.figure.axes) == 1 and not ax.patches
        assert len(ax.lines) == 1
    finally:
        plt.close(ax.figure)


def test_quantile_fan_pairs_symmetric_quantiles(sample_store):
    steps = el.distribution(sample_store, "vanilla").steps
    floor = 1e-4
    ax = plots.quantile_fan(steps, run="vanilla", floor=floor, ax=new_ax())
    assert ax.get_yscale() == "log"
    x = steps["step"].to_numpy(float)
    median = by_gid(ax.lines, "line:p50")
    np.testing.assert_array_equal(median.get_ydata(), np.maximum(steps["p50"], floor))
    np.testing.assert_array_equal(by_gid(ax.lines, "line:entropy_token_mean").get_ydata(),
                                  np.maximum(steps["entropy_token_mean"], floor))
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert sorted(b.get_gid() for b in bands) == ["band:p10-p90", "band:p25-p75"]
    band = by_gid(bands, "band:p10-p90")
    vertices = {tuple(v) for v in band.get_paths()[0].vertices}
    for column in ("p10", "p90"):
        expected = {(a, b) for a, b in zip(x, np.maximum(steps[column].to_numpy(float), floor))}
        assert expected <= vertices, column
    # the tail beyond the widest band is its own dotted line
    np.testing.assert_array_equal(by_gid(ax.lines, "line:p99").get_ydata(),
                                  np.maximum(steps["p99"], floor))


def test_saturation_fit_draws_points_law_band_and_ceiling(sample_store):
    fit = el.fit_saturation(sample_store, "vanilla")
    ax = plots.saturation_fit(fit, ax=new_ax())
    points = by_gid([c for c in ax.collections if isinstance(c, PathCollection)], "points")
    np.testing.assert_allclose(points.get_offsets(), fit.data.sort_values("step")[["H", "R"]])
    law = by_gid(ax.lines, "law")
    h = np.asarray(law.get_xdata())
    assert h[0] == 0 and h[-1] >= fit.data["H"].max()
    np.testing.assert_allclose(law.get_ydata(), -fit.a * np.exp(h) + fit.b, rtol=1e-12)
    assert by_gid(ax.lines, "ceiling").get_ydata()[0] == pytest.approx(fit.b - fit.a)
    assert law.get_label() == f"R = −{fit.a:.3g}·exp(H) + {fit.b:.3g}  (R² {fit.r2:.2f})"
    assert law_label(-0.0051, 0.003) == "R = 0.0051·exp(H) + 0.003"
    assert law_label(0.1, -0.2) == "R = −0.1·exp(H) − 0.2"
    band = by_gid(ax.collections, "band").get_paths()[0].vertices
    lower, upper = plots.law_band(fit, h)
    assert np.all(lower <= law.get_ydata() + 1e-12) and np.all(law.get_ydata() <= upper + 1e-12)
    assert band[:, 1].min() == pytest.approx(lower.min()) and \
        band[:, 1].max() == pytest.approx(upper.max())
    # the band is the envelope over the corners of the two bootstrap intervals
    corners = [-a * np.exp(h) + b for a in fit.a_ci for b in fit.b_ci]
    np.testing.assert_allclose(lower, np.min(corners, axis=0))


def test_forking_bars_are_the_counts_with_readable_labels(sample_store):
    forking = el.forking_tokens(sample_store, "vanilla")
    top = forking.top_tokens
    ax = plots.forking_tokens_bar(top, run="vanilla", top_n=12, ax=new_ax())
    widths = [bar.get_width() for bar in ax.patches]
    assert widths == top["forking_count"].head(12).astype(float).tolist()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [token_label(t) for t in top["token"].head(12)]
    assert "␣apples" in labels and not any("Ġ" in label for label in labels)
    rate = plots.forking_tokens_bar(top, value="forking_rate", ax=new_ax())
    assert [b.get_width() for b in rate.patches][:3] == top["forking_rate"].head(3).tolist()


def test_planning_execution_lines_follow_the_roles_tables(sample_store):
    roles = el.roles(sample_store, "vanilla")
    ax = plots.planning_execution(roles.steps, run="vanilla", semantic=roles.semantic,
                                  ax=new_ax())
    for cls in ("planning", "execution"):
        rows = roles.steps[roles.steps["cls"] == cls].sort_values("step")
        line = by_gid(ax.lines, f"cls:{cls}")
        np.testing.assert_array_equal(line.get_xdata(), rows["step"].to_numpy(float))
        np.testing.assert_array_equal(line.get_ydata(), rows["mean_entropy"].to_numpy(float))
    semantic = by_gid(twin_of(ax).lines, "semantic")
    rows = roles.semantic.sort_values("step")
    np.testing.assert_array_equal(semantic.get_ydata(), rows["semantic_entropy"].to_numpy(float))


def test_covariance_groups_one_line_per_group(sample_store):
    cov = el.covariance(sample_store, "vanilla")
    ax = plots.covariance_groups(cov.groups, ax=new_ax())
    groups = list(pd.unique(cov.groups["group"]))
    assert [line.get_gid() for line in ax.lines if line.get_gid()] == \
        [f"group:{g}" for g in groups]
    for group in groups:
        rows = cov.groups[cov.groups["group"] == group].sort_values("step")
        np.testing.assert_array_equal(by_gid(ax.lines, f"group:{group}").get_ydata(),
                                      rows["mean_cov"].to_numpy(float))
    assert ax.get_yscale() == "symlog"


def test_run_overlay_draws_each_run(sample_store):
    curves = el.compare(sample_store).curves
    ax = plots.run_overlay(curves, metric="policy_entropy", ax=new_ax())
    for run in ("top20", "vanilla"):
        rows = curves[(curves.run == run) & (curves.metric == "policy_entropy")]
        np.testing.assert_array_equal(by_gid(ax.lines, f"run:{run}").get_ydata(),
                                      rows.sort_values("step")["value"].to_numpy(float))
    colors = {line.get_gid(): line.get_color() for line in ax.lines}
    assert colors["run:top20"] != colors["run:vanilla"]


def test_bad_inputs_say_what_is_wrong(sample_store):
    steps = el.summary(sample_store).steps
    with pytest.raises(ValueError, match="several runs"):
        plots.quantile_fan(steps, ax=new_ax())
    with pytest.raises(ValueError, match="needs columns entropy"):
        plots.entropy_curve(steps, run="vanilla", ax=new_ax())
    with pytest.raises(ValueError, match="pNN quantile columns"):
        plots.quantile_fan(pd.DataFrame({"step": [0, 1]}), ax=new_ax())


def test_token_text_is_decoded_for_display():
    # byte-level pieces: Ġ is a space, Ċ a newline; "’" is split over three pieces
    assert decode_tokens(["Hello", "Ġworld", "Ċ", "âĢ", "Ļ"]) == ["Hello", " world", "\n",
                                                                  "", "’"]
    assert decode_tokens(["▁The", "▁cat"]) == [" The", " cat"]
    assert decode_tokens([" already", " text", None]) == [" already", " text", ""]
    assert token_label("Ġthe") == "␣the" and token_label("Ċ") == "↵" and token_label("") == "∅"
