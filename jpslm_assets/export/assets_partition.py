"""Stage 3's partition (one adapter) as its assets see it: the adapter a run exports, its training run, and the table metadata every stage-3 table shares."""

from __future__ import annotations

from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets.export.tables import PARTITION_COLUMN
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.partitions import (
    Stage3Adapter,
    stage3_adapter,
)


def partition_adapter(context: dg.AssetExecutionContext) -> Stage3Adapter:
    """The adapter of the stage-3 partition being materialized."""
    try:
        return stage3_adapter(context.partition_key)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def stage3_metadata(table: str, format_name: str | None = None) -> dict[str, Any]:
    return table_metadata(
        table, partition_expr=PARTITION_COLUMN, fixed={"format": format_name} if format_name else None
    )


def adapter_run(
    adapter: Stage3Adapter,
    stage1_lora_adapter: pl.DataFrame,
    stage2_lora_adapter: pl.DataFrame,
    optimal_scale: pl.DataFrame,
) -> dict[str, Any]:
    """The training run a stage-3 partition exports: the model's stage-2 adapter, or for ``@stage1`` the
    reference model's stage-1 adapter at n*."""
    if adapter.stage == 2:
        rows = stage2_lora_adapter.filter(pl.col("model") == adapter.model)
        what = f"stage2_lora_adapter[{adapter.model}] (train.stage2_runs)"
    else:
        if optimal_scale.height != 1:
            raise dg.Failure("eval.optimal_scale has no n*: materialize optimal_scale (stage 1) first.")
        n = int(optimal_scale["n"][0])
        rows = stage1_lora_adapter.filter(
            (pl.col("model") == adapter.model) & (pl.col("n").cast(pl.Int64) == n)
        )
        what = f"stage1_lora_adapter[{n}] (train.stage1_runs, n* = {n})"
    if rows.height != 1:
        raise dg.Failure(f"{what} has {rows.height} rows (expected 1): materialize it first.")
    return rows.row(0, named=True)


def adapter_columns(adapter: Stage3Adapter, n: int) -> dict[str, Any]:
    """The identifying columns every stage-3 row starts with."""
    return {PARTITION_COLUMN: adapter.key, "stage": adapter.stage, "model": adapter.model, "n": n}
