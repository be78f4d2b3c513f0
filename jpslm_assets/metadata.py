"""Table metadata in the forms Dagster's UI and catalog understand, one helper for every asset and check.

- ``table_value``: a small frame (shares per relation type, checks per subset, a mart's first rows) as a
  ``MetadataValue.table`` with its schema, instead of hand-built Markdown; the UI sorts and renders it.
- ``counts_table``: label -> count with each count's share, as such a table.
- ``stored_table``: where an asset's rows live, under the keys of Dagster's ``TableMetadataSet``
  (``dagster/table_name``, ``dagster/row_count``, ``dagster/column_schema``), which the catalog indexes and
  shows on the asset page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import polars as pl


def _column_type(dtype: pl.DataType) -> str:
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    return "bool" if dtype == pl.Boolean else "string"


def column_schema(frame: pl.DataFrame) -> dg.TableSchema:
    """The frame's columns and polars types, as Dagster shows them under "Columns"."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])


def _cell(value: Any, percent: bool, digits: int) -> str | int | float | bool | None:
    if value is None:
        return None
    if percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, (bool, int, str)):
        return value
    return str(value)


def table_value(
    frame: pl.DataFrame, percent: Sequence[str] = (), digits: int = 4, limit: int | None = None
) -> dg.TableMetadataValue:
    """``frame`` (its first ``limit`` rows) as a metadata table; ``percent`` columns are shown as "17.1%"."""
    shown = frame if limit is None else frame.head(limit)
    columns = [
        dg.TableColumn(name, "string" if name in percent else _column_type(dtype))
        for name, dtype in shown.schema.items()
    ]
    records = [
        dg.TableRecord({name: _cell(value, name in percent, digits) for name, value in row.items()})
        for row in shown.iter_rows(named=True)
    ]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def counts_table(counts: Mapping[str, int], key: str) -> dg.TableMetadataValue:
    """One row per label with its count and its share of the total."""
    total = sum(counts.values()) or 1
    frame = pl.DataFrame(
        {key: list(counts), "count": list(counts.values()), "share": [c / total for c in counts.values()]},
        schema={key: pl.Utf8, "count": pl.Int64, "share": pl.Float64},
    )
    return table_value(frame, percent=("share",))


def stored_table(table: str, frame: pl.DataFrame) -> dict[str, Any]:
    """Where the rows are stored and how many, with their schema (``TableMetadataSet`` keys)."""
    return {
        "dagster/table_name": table,
        "dagster/row_count": dg.MetadataValue.int(frame.height),
        "dagster/column_schema": column_schema(frame),
    }


def table_rows(value: dg.TableMetadataValue) -> list[dict[str, Any]]:
    """The records of a metadata table as plain dicts (for reading metadata back, e.g. in tests)."""
    return [dict(record.data) for record in value.records]
