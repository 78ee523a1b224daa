"""The functions ``el.ingest`` and ``el.report`` are their subpackages, made callable, so
``entropylens.ingest.from_vllm`` and ``el.ingest(...)`` both work."""

from __future__ import annotations

import inspect
import sys

import pyarrow.parquet as pq


def test_ingest_is_the_subpackage_and_the_function(tmp_path):
    import entropylens as el
    import entropylens.ingest as ingest_package
    from entropylens.ingest.driver import ingest as ingest_function

    from conftest import SAMPLE_LOGS

    assert el.ingest is ingest_package
    assert callable(ingest_package.from_vllm)          # the README's el.ingest.from_vllm(...)
    assert inspect.signature(ingest_package.ingest) == inspect.signature(ingest_function)
    runs = el.ingest(SAMPLE_LOGS / "vanilla", tmp_path / "store", run="v")
    assert runs == ["v"]
    tokens = el.open(tmp_path / "store").read_tokens("v", columns=["step"])
    assert tokens.num_rows == pq.read_metadata(SAMPLE_LOGS / "vanilla" / "tokens.parquet").num_rows
    assert "run" in inspect.signature(el.ingest).parameters


def test_report_is_the_subpackage_and_the_function(tmp_path, sample_store):
    import entropylens as el
    import entropylens.report as report_package

    assert el.report is report_package
    assert report_package.build_report.__module__ == "entropylens.report.build"
    assert list(inspect.signature(el.report).parameters)[:3] == ["store", "out", "runs"]
    result = el.report(sample_store, tmp_path / "report", "vanilla")
    assert result.path == tmp_path / "report" / "index.html" and result.path.is_file()
    assert isinstance(result, report_package.Report)


def test_a_callable_module_calls_the_named_attribute():
    import types

    from entropylens.base.modules import CallableModule, make_callable

    module = types.ModuleType("entropylens_test_callable")
    module.twice = lambda x: 2 * x
    sys.modules[module.__name__] = module
    try:
        make_callable(module.__name__, "twice")
        assert isinstance(module, CallableModule) and module(4) == 8 and module.twice(1) == 2
    finally:
        del sys.modules[module.__name__]
