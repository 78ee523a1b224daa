import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import entropylens as el
from entropylens.store import Store
from _eos import after_eos, before_eos


def _numpy_summary(tokens: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for step, group in tokens.groupby("step"):
        h = group["entropy"].to_numpy(dtype=np.float64)
        seq = group.groupby(["prompt_idx", "sample_idx"])["entropy"].apply(
            lambda s: s.to_numpy(dtype=np.float64).mean())
        rows.append({"step": step, "tokens": len(h), "entropy_token_mean": h.mean(),
                     "entropy_seq_mean": seq.mean(), "p50": np.quantile(h, 0.5),
                     "p80": np.quantile(h, 0.8), "frac_below_0_01": np.mean(h < 0.01)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("keep", [False, True])
def test_summary_equals_numpy_on_the_shared_run(shared_store, shared_run, keep):
    result = el.summary(shared_store, "vanilla", keep_after_eos=keep)
    raw = pd.read_parquet(shared_run / "vanilla" / "tokens.parquet")
    padding = int(after_eos(raw).sum())
    expected = _numpy_summary(raw if keep else before_eos(raw))
    got = result.steps.reset_index(drop=True)
    assert got["step"].tolist() == expected["step"].tolist()
    assert got["tokens"].tolist() == expected["tokens"].tolist()
    for column in ("entropy_token_mean", "entropy_seq_mean", "p50", "p80", "frac_below_0_01"):
        np.testing.assert_allclose(got[column].to_numpy(dtype=float), expected[column],
                                   rtol=1e-9, err_msg=column)
    run = result.runs.iloc[0]
    assert run["tokens"] == len(raw) and run["entropy_source"] == "exact"
    # counted either way, and the same count as the ingest's marks
    assert run["tokens_after_eos"] == padding == 3627
    assert shared_store.manifest("vanilla")["counts"]["tokens_after_eos"] == padding
    assert run["after_eos"] == ("kept" if keep else "excluded")
    assert result.to_dict()["runs"][0]["tokens_after_eos"] == padding


def test_vanilla_sample_collapses_and_top20_does_not(sample_store):
    steps = el.summary(sample_store).steps
    vanilla = steps[steps.run == "vanilla"].set_index("step")["entropy_token_mean"]
    top20 = steps[steps.run == "top20"].set_index("step")["entropy_token_mean"]
    assert vanilla.iloc[:3].mean() > 1.5 and vanilla.iloc[-5:].mean() < 0.2
    assert top20.iloc[-5:].mean() > 1.5


def test_summary_of_a_single_token_step_and_surprisal_source(tmp_path):
    store = Store.create(tmp_path / "s")
    with store.write_run("r") as writer:
        writer.write_tokens(pa.table({"step": [0, 1, 1], "sample_id": ["a", "a", "b"],
                                      "position": [0, 0, 0], "logprob": [-0.5, -1.0, -2.0]}))
    result = el.summary(store)
    assert result.runs.loc[0, "entropy_source"] == "surprisal"
    steps = result.steps.set_index("step")
    assert steps.loc[0, "tokens"] == 1 and steps.loc[0, "p80"] == pytest.approx(0.5)
    assert steps.loc[1, "entropy_token_mean"] == pytest.approx(1.5)
    assert steps.loc[1, "entropy_seq_mean"] == pytest.approx(1.5)


def test_metric_only_run_reports_its_entropy_metric(tmp_path, shared_run):
    el.ingest(shared_run / "vanilla" / "metrics.csv", tmp_path / "s", run="m")
    result = el.summary(tmp_path / "s")
    assert result.runs.loc[0, "entropy_source"] == "metric"
    raw = pd.read_csv(shared_run / "vanilla" / "metrics.csv").dropna(subset=["entropy"])
    np.testing.assert_allclose(result.steps["entropy_token_mean"], raw["entropy"])
