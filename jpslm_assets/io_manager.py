"""The IO manager: an asset's polars frame into the store table its definition metadata names, replacing its
partition's rows atomically together with the lineage rows (``lineage.py``); and the metadata helpers assets
use to name their table and partition columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets.artifacts import frame_version
from jpslm_assets.lineage import LineageRecord, UpstreamRead
from jpslm_assets.metadata import stored_table
from jpslm_assets.store import DuckDBStore, StoreError

TABLE_NAME = "dagster/table_name"  # the key Dagster's catalog reads a table's name from (TableMetadataSet)


def table_of(metadata: Mapping[str, Any] | None) -> str | None:
    """The DuckDB table an asset's definition metadata names (``table_metadata``), or None."""
    value = (metadata or {}).get(TABLE_NAME)
    return str(value) if value is not None else None


def table_metadata(
    table: str,
    partition_expr: Mapping[str, str] | str | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Definition metadata an asset passes so the IO manager knows its table and partition columns.

    ``partition_expr``: column holding the partition key (single dimension) or a dict
    ``{dimension: column}`` for multi-partitions. ``fixed``: constant column values that also identify the
    slice, e.g. ``{"format": "f16"}`` when several per-format assets share one table.
    """
    metadata: dict[str, Any] = {TABLE_NAME: table}
    if partition_expr is not None:
        metadata["partition_expr"] = partition_expr
    if fixed:
        metadata["fixed_columns"] = dict(fixed)
    return metadata


def _key_string(asset_key: dg.AssetKey) -> str:
    return asset_key.to_user_string()


def _partition_slices(
    metadata: Mapping[str, Any], partition_keys: Sequence[str] | None
) -> list[dict[str, Any]]:
    fixed = dict(metadata.get("fixed_columns") or {})
    expr = metadata.get("partition_expr")
    if expr is None or partition_keys is None:
        return [fixed]
    slices = []
    for key in partition_keys:
        values = dict(fixed)
        if isinstance(expr, Mapping):
            by_dimension = getattr(key, "keys_by_dimension", None)
            if by_dimension is None:
                raise StoreError(
                    f"partition key {key!r} is not multi-dimensional but partition_expr is {expr}"
                )
            for dimension, column in expr.items():
                values[column] = by_dimension[dimension]
        else:
            values[str(expr)] = key
        slices.append(values)
    return slices


class DuckDBTableIOManager(dg.ConfigurableIOManager):
    """Stores polars frames as DuckDB tables; each write also records lineage in the same transaction."""

    store: DuckDBStore

    def _reads(self) -> dict[str, list[UpstreamRead]]:
        # Inputs loaded for the step about to emit output, keyed by op name; a step process builds its own
        # IO manager, and the in-process executor runs one step at a time, so this never mixes steps.
        if not hasattr(self, "_pending_reads"):
            object.__setattr__(self, "_pending_reads", {})
        return self._pending_reads  # type: ignore[attr-defined]

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame) -> None:
        if obj is None:
            return
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(
                f"asset {_key_string(context.asset_key)} returned {type(obj).__name__}; "
                "table assets must return a polars DataFrame"
            )
        metadata = context.definition_metadata or {}
        table = table_of(metadata)
        if table is None:
            raise StoreError(
                f"asset {_key_string(context.asset_key)} has no '{TABLE_NAME}' metadata; use io_manager.table_metadata()."
            )
        partition_keys = context.asset_partition_keys if context.has_asset_partitions else None
        slices = _partition_slices(metadata, partition_keys)
        if len(slices) != 1:
            raise StoreError(
                f"asset {_key_string(context.asset_key)} writes {len(slices)} partitions in one step; "
                "materialize one partition per step."
            )
        # An unpartitioned asset inside a partitioned run still has no partition of its own.
        partition_key = context.partition_key if context.has_asset_partitions else None
        reads = self._reads().pop(context.op_def.name, [])
        record = LineageRecord(
            asset_key=_key_string(context.asset_key),
            partition_key=partition_key,
            run_id=context.run_id,
            code_version=context.asset_spec.code_version,
            started_at=None,
            upstream=reads,
        )
        frame = obj
        for column, value in slices[0].items():
            if column not in frame.columns:
                frame = frame.with_columns(pl.lit(value).alias(column))
        self.store.write_slice(table, frame, slices[0], record)
        context.add_output_metadata({**stored_table(table, frame), "data_version": frame_version(frame)})

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        upstream = context.upstream_output
        metadata = (upstream.definition_metadata if upstream else None) or {}
        table = table_of(metadata)
        if table is None:
            raise StoreError(f"upstream asset {_key_string(context.asset_key)} has no '{TABLE_NAME}' metadata")
        partition_keys = list(context.asset_partition_keys) if context.has_asset_partitions else None
        if partition_keys == []:
            # The partition mapping gives this partition nothing of that upstream (e.g. stage 3's stage-2
            # partitions read no stage-1 adapter): no rows, and no lineage row for a read that did not happen.
            return self.store.read_slices(table, [], allow_missing=True)
        slices = _partition_slices(metadata, partition_keys)
        frame = self.store.read_slices(table, slices)
        reads = self._reads().setdefault(context.op_def.name, [])
        read_keys: list[str | None] = list(partition_keys) if partition_keys else [None]
        with self.store.connect(read_only=True) as conn:
            for key in read_keys:
                mat_id, version = self.store.latest_materialization(conn, _key_string(context.asset_key), key)
                reads.append(UpstreamRead(_key_string(context.asset_key), key, version, mat_id))
        return frame
