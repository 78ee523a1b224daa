import pyarrow as pa
import pytest

from entropylens.errors import SchemaError
from entropylens.schema import METRIC_SCHEMA, TOKEN_SCHEMA, conform, validate


def test_conform_adds_missing_nullable_columns_and_casts():
    table = pa.table({"sample_id": ["a", "b"], "position": pa.array([0, 1], pa.int64()),
                      "entropy": [0.5, 1.0],
                      "top_ids": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32(), 2))})
    out = conform(table, "tokens")
    assert out.schema == TOKEN_SCHEMA
    assert out.column("step").null_count == 2
    assert out.column("top_ids").to_pylist() == [[1, 2], [3, 4]]
    validate(out, "tokens")


def test_conform_names_missing_required_column():
    with pytest.raises(SchemaError) as info:
        conform(pa.table({"position": [0]}), "tokens", path="x.parquet")
    assert info.value.field == "sample_id"
    assert "x.parquet" in str(info.value)


def test_conform_names_first_null_in_required_column():
    table = pa.table({"sample_id": ["a", None, None], "position": [0, 1, 2]})
    with pytest.raises(SchemaError) as info:
        conform(table, "tokens", row_offset=10)
    assert info.value.field == "sample_id"
    assert "row 12" in str(info.value)


def test_conform_names_first_value_of_wrong_type():
    table = pa.table({"sample_id": ["a", "b", "c"], "position": ["0", "1", "x"]})
    with pytest.raises(SchemaError) as info:
        conform(table, "tokens")
    assert info.value.field == "position"
    assert "row 3" in str(info.value) and "'x'" in str(info.value)


def test_validate_rejects_unknown_split():
    table = conform(pa.table({"metric": ["kl"], "value": [0.1], "split": ["dev"]}), "metrics")
    assert table.schema == METRIC_SCHEMA
    with pytest.raises(SchemaError, match="split 'dev'"):
        validate(table, "metrics")
