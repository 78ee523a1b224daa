"""Shared fixtures: paths to the real data and stores ingested from it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_LOGS = REPO / "sample_logs"
SHARED = REPO.parent / "shared"
SMOLLM2 = SHARED / "runs" / "smollm2_grpo_taskB"
SAMPLES = SHARED / "samples"


@pytest.fixture(scope="session")
def shared_run() -> Path:
    """The full shared SmolLM2 GRPO run (``vanilla/`` and ``top20/``)."""
    if not SMOLLM2.is_dir():
        pytest.skip("the shared SmolLM2 run is not beside the repository")
    return SMOLLM2


@pytest.fixture(scope="session")
def shared_samples() -> Path:
    """The real log excerpts of ``../shared/samples``."""
    if not SAMPLES.is_dir():
        pytest.skip("../shared/samples is not beside the repository")
    return SAMPLES


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory):
    """A store holding both sample runs (``vanilla`` and ``top20``); treat as read-only."""
    import entropylens as el

    path = tmp_path_factory.mktemp("sample") / "store"
    for name in ("vanilla", "top20"):
        el.ingest(SAMPLE_LOGS / name, path, run=name, step_basis="policy_version")
    return el.open(path)


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory, shared_run):
    """A store holding both full shared runs; treat as read-only."""
    import entropylens as el

    path = tmp_path_factory.mktemp("shared") / "store"
    for name in ("vanilla", "top20"):
        # the run's README: step s is the policy after s updates, for tokens and validation
        el.ingest(shared_run / name, path, run=name, step_basis="policy_version")
    return el.open(path)
