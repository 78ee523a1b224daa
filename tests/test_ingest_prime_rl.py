"""prime_rl: token_exports folders written as prime-rl's TokenExporter writes them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import entropylens as el
from entropylens.errors import FormatError
from entropylens.ingest import detect

from _ingest_helpers import FIXTURES, ingest_one, real_sequences, real_tokens

EXPORTS = FIXTURES / "prime_rl" / "token_exports"


def _truth():
    truth = real_tokens()
    sample_ids = []
    for p, s in zip(truth.prompt_idx, truth.sample_idx):
        sample_ids.append(f"p0-s{s}" if p == 0 else f"1-{s}")  # rank 1: <rank>-<index>
    truth["sample_id"] = sample_ids
    return truth.sort_values(["step", "sample_id", "position"]).reset_index(drop=True)


def test_folder_gives_the_generated_tokens_with_exact_entropy(tmp_path):
    for path in (FIXTURES / "prime_rl", EXPORTS, EXPORTS / "step_0"):
        assert detect(path).name == "prime_rl"
    tokens, sequences, manifest = ingest_one(FIXTURES / "prime_rl", tmp_path)
    truth = _truth()
    assert len(tokens) == len(truth)  # prompt tokens (loss_mask false) are not stored
    assert tokens["sample_id"].tolist() == truth["sample_id"].tolist()
    np.testing.assert_array_equal(tokens["step"], truth["step"])
    np.testing.assert_array_equal(tokens["token_id"], truth["token_id"])
    assert tokens["position"].tolist() == truth["position"].tolist()
    np.testing.assert_allclose(tokens["logprob"], truth["logprob"], rtol=1e-6)
    np.testing.assert_allclose(tokens["advantage"], truth["advantage"], rtol=1e-6)
    entropy = tokens["entropy"].to_numpy()
    expected = truth["entropy"].to_numpy(dtype=float)
    nulled = (truth.step == 0) & (truth.prompt_idx == 0) & (truth.sample_idx == 1) \
        & (truth.position == 3)
    assert np.isnan(entropy[nulled.to_numpy()]).all()  # exported as null (non-finite)
    np.testing.assert_allclose(entropy[~nulled.to_numpy()], expected[~nulled.to_numpy()],
                               rtol=1e-6)
    assert set(tokens["split"]) == {"train"}
    assert manifest["temperature"] == 1.0 and manifest["logprob_basis"] == "tempered"
    assert "exact" in manifest["entropy_sources"]
    rank_files = [s for s in manifest["sources"] if s["path"].endswith(".jsonl")]
    assert len(rank_files) == 4 and all(s["sha256"] for s in rank_files)
    assert "steps_without_stable_marker" not in manifest.get("notes", {})
    seq = real_sequences()
    assert sorted(sequences["reward"]) == sorted(seq["reward"])
    assert sequences["num_tokens"].sum() == len(truth)


def test_one_rank_file_and_missing_stable_marker(tmp_path):
    tokens, _, _ = ingest_one(EXPORTS / "step_1" / "rank_1.jsonl", tmp_path / "a")
    truth = real_tokens(steps=[1])
    assert len(tokens) == int((truth.prompt_idx == 1).sum())
    copy = tmp_path / "exports"
    shutil.copytree(EXPORTS, copy)
    (copy / "step_1" / "STABLE").unlink()
    _, _, manifest = ingest_one(copy, tmp_path / "b")
    assert manifest["notes"]["steps_without_stable_marker"] == [1]


def test_misaligned_arrays_name_the_field(tmp_path):
    copy = tmp_path / "exports"
    shutil.copytree(EXPORTS, copy)
    path = copy / "step_0" / "rank_1.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["entropy"] = record["entropy"][:-1]
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError) as info:
        el.ingest(copy, tmp_path / "s", run="r", progress=False)
    assert info.value.field == "entropy" and info.value.line == 2
    assert info.value.path == str(path)
    tokens, _, manifest = ingest_one(copy, tmp_path, on_error="skip")
    assert manifest["rejected"]["count"] == 1
    assert len(tokens) < len(_truth())


def test_run_ids_split_into_runs(tmp_path):
    source = EXPORTS / "step_0" / "rank_0.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    for i, record in enumerate(records):
        record["run_id"] = "alpha" if i % 2 == 0 else "beta"
    path = tmp_path / "rank_0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = el.ingest(path, tmp_path / "s", progress=False)
    assert sorted(runs) == ["alpha", "beta"]
    store = el.open(tmp_path / "s")
    total = sum(store.manifest(r)["counts"]["tokens"] for r in runs)
    assert total == sum(sum(r["loss_mask"]) for r in records)
