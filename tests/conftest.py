"""Shared fixtures: paths to the real data and stores ingested from it.

The tests own their data: ``sample_logs/`` (an excerpt of the SmolLM2 GRPO run) and
``tests/fixtures/`` (real files; ``fixtures/samples`` is a copy of ``../shared/samples``
without ``wild/``, each README gives the sources). Only the full shared run
(``runs/smollm2_grpo_taskB``, 10 MB) stays outside the repository: it is found through
``ENTROPYLENS_SHARED`` (default: ``../shared`` beside the repository), and a test that needs
it fails, loudly, when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_LOGS = REPO / "sample_logs"
FIXTURES = REPO / "tests" / "fixtures"
#: Real log excerpts from ../shared/samples, copied into the repository.
SAMPLES = FIXTURES / "samples"
#: The shared data that stays outside the repository (see the module docstring).
SHARED = Path(os.environ.get("ENTROPYLENS_SHARED", REPO.parent / "shared"))
SMOLLM2 = SHARED / "runs" / "smollm2_grpo_taskB"


def shared_path(path: Path) -> Path:
    """``path`` under :data:`SHARED`; a test failure (not a skip) when it is missing."""
    if not path.exists():
        pytest.fail(f"{path} is missing: set ENTROPYLENS_SHARED to the folder that holds "
                    "runs/smollm2_grpo_taskB (default: ../shared beside the repository)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def shared_run() -> Path:
    """The full shared SmolLM2 GRPO run (``vanilla/`` and ``top20/``)."""
    return shared_path(SMOLLM2)


@pytest.fixture(scope="session")
def shared_samples() -> Path:
    """The real log excerpts, in the repository (``tests/fixtures/samples``)."""
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


#: Fixtures that make every test using them slow (each costs seconds to minutes here):
#: the full shared run (a 10 MB run ingested and compared value by value), the SmolLM2 model
#: loaded with torch, notebooks executed in fresh kernels, a local Ray instance, Chromium.
SLOW_FIXTURES = {"shared_run", "shared_store", "model", "executed", "ray_instance", "browser"}


def pytest_collection_modifyitems(config, items):
    # marked here rather than test by test so that a new test on these fixtures is marked
    # too; the tests on the shared run are the only ones that need ENTROPYLENS_SHARED, so
    # `make test-fast` (-m "not slow") runs without it
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
