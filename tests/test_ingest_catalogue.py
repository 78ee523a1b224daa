"""The catalogue of built-in formats: every entry reaches a real reader, none is forgotten,
and a format registered by a user takes part in detection."""

from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path

import pyarrow as pa
import pytest

import entropylens.ingest as ingest_package
from entropylens.ingest import registry
from entropylens.ingest.catalogue import BUILTIN_FORMATS
from entropylens.ingest.registry import Chunk, Format, ReaderFunction

PACKAGE = Path(ingest_package.__file__).parent


BUILTIN = [registry.get_format(fields["name"]) for fields in BUILTIN_FORMATS]


def test_every_builtin_format_reaches_its_functions():
    names = [fields["name"] for fields in BUILTIN_FORMATS]
    assert len(names) == len(set(names))
    for fmt in BUILTIN:
        for role in (fmt.sniff, fmt.read):
            assert isinstance(role, ReaderFunction)
            module, _, function = role.target.partition(":")
            assert role.resolve() is getattr(
                importlib.import_module(f"entropylens.ingest.{module}"), function)


def test_every_reader_module_is_in_the_catalogue():
    # a module with a sniffer is a reader: it must be declared, or it is never detected
    declared = {fmt.sniff.target.partition(":")[0] for fmt in BUILTIN}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        sniffers = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name.startswith("sniff")]
        if sniffers and not path.stem.startswith("_"):
            assert path.stem in declared, f"{path.name} defines {sniffers} but no format"


def test_formats_lists_the_catalogue_in_name_order():
    listed = [fmt.name for fmt in registry.formats()]
    assert listed == sorted(listed)
    assert {fmt.name for fmt in BUILTIN} <= set(listed)


def test_reader_function_pickles_by_name_and_refuses_a_bad_target():
    function = ReaderFunction("vllm:sniff")
    function.resolve()
    copy = pickle.loads(pickle.dumps(function))
    assert copy.target == "vllm:sniff" and copy.resolve() is function.resolve()
    with pytest.raises(ValueError, match="module:function"):
        ReaderFunction("vllm.sniff")


def test_a_registered_format_is_detected_and_read(tmp_path):
    source = tmp_path / "scores.mylog"
    source.write_text("7 0.5\n8 0.25\n")

    def sniff(sample):
        return 0.95 if sample.suffix == ".mylog" else 0.0

    def read(path, ctx):
        steps, values = zip(*(line.split() for line in Path(path).read_text().splitlines()))
        yield Chunk("metrics", pa.table({"step": pa.array([int(s) for s in steps]),
                                         "metric": pa.array(["policy_entropy"] * len(steps)),
                                         "value": pa.array([float(v) for v in values])}))

    fmt = registry.register(Format("my_log", "a test format", sniff=sniff, read=read,
                                   produces=("metrics",)))
    try:
        assert registry.detect(source) is fmt
        import entropylens as el

        el.ingest(source, tmp_path / "store", run="mine")
        metrics = el.open(tmp_path / "store").read_metrics("mine")
        assert sorted(metrics["value"]) == [0.25, 0.5]
    finally:
        registry._REGISTRY.pop("my_log", None)
