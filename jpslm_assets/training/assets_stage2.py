"""Stage 2 (models): every model of the profile trained at n*, and its test NLL.

No ``from __future__ import annotations`` here: Dagster reads the real annotations of asset parameters."""

import dagster as dg
import polars as pl

from jpslm_assets.code_versions import versioned
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.outputs import single_row
from jpslm_assets.partitions import model_partitions
from jpslm_assets.resources.models import ModelFactory
from jpslm_assets.resources.trainer import LoraTrainer
from jpslm_assets.settings import current_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training.assets_adapters import (
    NLL_DESCRIPTION,
    PAPER_SETTINGS,
    LoraRunConfig,
    NllScoringConfig,
    score_test_nll,
    train_adapter,
)
from jpslm_assets.training.tables import EVALUATION_GROUP, RUNS_TABLES, TEST_NLL_TABLES, TRAINING_GROUP


@versioned()
@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch", "huggingface", "duckdb"},
    partitions_def=model_partitions(),
    **GPU_STEP,
    ins={
        "base_model": dg.AssetIn(),
        "optimal_scale": dg.AssetIn(),
        # The nested subsets are one data set: stage 2 reads the one of size n*.
        "training_subset": dg.AssetIn(partition_mapping=dg.AllPartitionMapping()),
    },
    metadata=table_metadata(RUNS_TABLES[2], partition_expr="model"),
    description=(
        "Stage 2 (models): an adapter of every model of the profile at the n* that optimal_scale chose, with "
        "the stage-2 LoRA shape (paper: r=32, alpha 16, dropout 0.05). n* is read from optimal_scale's data, "
        "so a new n* makes every stage-2 adapter stale. " + PAPER_SETTINGS
    ),
)
def stage2_lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraRunConfig,
    base_model: pl.DataFrame,
    optimal_scale: pl.DataFrame,
    training_subset: pl.DataFrame,
    trainer: LoraTrainer,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    profile = current_profile()
    chosen = single_row(optimal_scale, "optimal_scale (eval.optimal_scale)", model=profile.stage1_model)
    n = int(chosen["n"])
    context.log.info(f"stage 2 at n*={n}, chosen by stage 1 on {profile.stage1_model}")
    return train_adapter(
        context, config, 2, context.partition_key, n, base_model, training_subset, trainer, store
    )


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pytorch", "duckdb"},
    partitions_def=model_partitions(),
    **GPU_STEP,
    metadata=table_metadata(TEST_NLL_TABLES[2], partition_expr="model"),
    description="Stage 2: " + NLL_DESCRIPTION,
)
def stage2_test_nll(
    context: dg.AssetExecutionContext,
    config: NllScoringConfig,
    stage2_lora_adapter: pl.DataFrame,
    test_set: pl.DataFrame,
    model_factory: ModelFactory,
) -> dg.Output[pl.DataFrame]:
    run = single_row(
        stage2_lora_adapter, "stage2_lora_adapter (train.stage2_runs)", model=context.partition_key
    )
    return score_test_nll(context, config, run, test_set, model_factory)


stage2_job = dg.define_asset_job(
    "stage2_model_comparison",
    selection=dg.AssetSelection.assets(stage2_lora_adapter, stage2_test_nll),
    partitions_def=model_partitions(),
    description="Stage 2: one model trained and scored at n* with the stage-2 LoRA shape (backfill: every model).",
)
