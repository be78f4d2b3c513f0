"""Stage 1 (scale): the reference model's adapters over the n grid, their test NLL, the scale curve and n*.

No ``from __future__ import annotations`` here: Dagster reads the real annotations of asset parameters."""

from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.code_versions import versioned
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.metadata import table_value
from jpslm_assets.outputs import png_metadata, single_row, versioned_output
from jpslm_assets.partitions import n_partitions
from jpslm_assets.resources.models import ModelFactory
from jpslm_assets.resources.trainer import LoraTrainer
from jpslm_assets.settings import current_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training import scaling
from jpslm_assets.training.assets_adapters import (
    NLL_DESCRIPTION,
    PAPER_SETTINGS,
    LoraRunConfig,
    NllScoringConfig,
    score_test_nll,
    train_adapter,
)
from jpslm_assets.training.plots import plot_loss_curves, plot_scale_curve
from jpslm_assets.training.tables import (
    EVALUATION_GROUP,
    LOSS_CURVE_TABLE,
    OPTIMAL_SCALE_TABLE,
    RUNS_TABLES,
    SCALE_CURVE_TABLE,
    TEST_NLL_TABLES,
    TRAINING_GROUP,
)


@versioned()
@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch", "huggingface", "duckdb"},
    partitions_def=n_partitions(),
    **GPU_STEP,
    ins={
        # Every n of stage 1 starts from the reference model's base.
        "base_model": dg.AssetIn(
            partition_mapping=dg.SpecificPartitionsPartitionMapping([current_profile().stage1_model])
        ),
        "training_subset": dg.AssetIn(),
    },
    metadata=table_metadata(RUNS_TABLES[1], partition_expr="n", fixed={"model": current_profile().stage1_model}),
    description=(
        "Stage 1 (scale): an adapter of the profile's reference model on the first n training pairs, with the "
        "stage-1 LoRA shape (paper: r=16, alpha 16, no dropout); LoRA on CPU, QLoRA on CUDA; " + PAPER_SETTINGS
    ),
)
def stage1_lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraRunConfig,
    base_model: pl.DataFrame,
    training_subset: pl.DataFrame,
    trainer: LoraTrainer,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    model = current_profile().stage1_model
    return train_adapter(
        context, config, 1, model, int(context.partition_key), base_model, training_subset, trainer, store
    )


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pytorch", "duckdb"},
    partitions_def=n_partitions(),
    **GPU_STEP,
    metadata=table_metadata(TEST_NLL_TABLES[1], partition_expr="n", fixed={"model": current_profile().stage1_model}),
    description="Stage 1: " + NLL_DESCRIPTION,
)
def stage1_test_nll(
    context: dg.AssetExecutionContext,
    config: NllScoringConfig,
    stage1_lora_adapter: pl.DataFrame,
    test_set: pl.DataFrame,
    model_factory: ModelFactory,
) -> dg.Output[pl.DataFrame]:
    run = single_row(stage1_lora_adapter, "stage1_lora_adapter (train.stage1_runs)", n=context.partition_key)
    return score_test_nll(context, config, run, test_set, model_factory)


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"duckdb", "polars"},
    metadata=table_metadata(SCALE_CURVE_TABLE),
)
def stage1_scale_curve(
    context: dg.AssetExecutionContext,
    stage1_test_nll: pl.DataFrame,
    stage1_lora_adapter: pl.DataFrame,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    """Stage 1's result, the paper's Table 2 for the reference model: test NLL, perplexity, the change
    from the previous n (``delta_nll``), the distance to the optimum with its paired bootstrap interval over
    the evaluation questions, and the status (optimal / indistinguishable from optimal / underfit /
    overfitting, by whether that interval excludes zero) for every n of the grid. Plots the U-curve with the
    intervals (Figure 6) and the training-loss curves per n (Figure 5)."""
    model = current_profile().stage1_model
    grid = current_profile().n_grid
    model_nll = stage1_test_nll.filter(pl.col("model") == model)
    nll = model_nll.select(pl.col("model"), pl.col("n").cast(pl.Int64), pl.col("nll").alias("test_nll"))
    runs = stage1_lora_adapter.filter(pl.col("model") == model).select(
        pl.col("n").cast(pl.Int64), "train_loss_final", pl.col("stage").cast(pl.Int64)
    )
    points = nll.join(runs, on="n", how="left").filter(pl.col("n").is_in(grid))
    missing = sorted(set(grid) - set(points["n"].to_list()))
    if missing:
        context.log.warning(
            f"{model}: no stage-1 test NLL yet for n={missing}; the curve covers {points['n'].to_list()}"
        )
    questions = _question_nll(model_nll)
    if questions is None:
        context.log.warning(
            f"{model}: eval.stage1_test_nll has no per-question NLLs (written before they were kept); the "
            "statuses follow the means alone. Re-materialize stage1_test_nll for intervals."
        )
    try:
        curve = scaling.scale_curve(points, questions, seed=current_profile().generation.seed)
    except scaling.ScaleCurveError as exc:
        raise dg.Failure(str(exc)) from exc
    best = scaling.optimal_n(curve)

    plots = settings.artifact_dir() / "plots"
    metadata: dict[str, Any] = {
        "optimal_n": best,
        "optimal_nll": float(curve.filter(pl.col("is_optimal"))["test_nll"][0]),
        "points": curve.height,
        "missing_n": dg.MetadataValue.json(missing),
        "statuses": dg.MetadataValue.json(dict(zip(map(str, curve["n"]), curve["status"], strict=True))),
        "scale_curve": table_value(curve),
        **png_metadata(
            f"scale_curve_{model}", plot_scale_curve(curve, f"{model}: n とテストNLL"), "U-curve", plots
        ),
    }
    if store.table_exists(LOSS_CURVE_TABLE):
        losses = store.read_slices(LOSS_CURVE_TABLE, [{"stage": 1, "model": model}]).filter(
            pl.col("n").is_in(grid)
        )
        if losses.height:
            metadata.update(
                png_metadata(
                    f"loss_curves_{model}",
                    plot_loss_curves(losses, f"{model}: n ごとの学習損失"),
                    "loss",
                    plots,
                )
            )
    context.log.info(f"{model}: lowest test NLL at n = {best} over {curve['n'].to_list()}")
    return versioned_output(curve, **metadata)


def _question_nll(nll: pl.DataFrame) -> pl.DataFrame | None:
    """One row per (n, question) from the per-question lists of the test-NLL rows; None if any row lacks them."""
    if "question_nll" not in nll.columns or nll.is_empty():
        return None
    if nll["question_nll"].null_count() or nll["question_answer_tokens"].null_count():
        return None
    frame = nll.select(
        pl.col("n").cast(pl.Int64),
        pl.col("question_ids").str.split(",").alias("question_id"),
        pl.col("question_nll").alias("nll"),
        pl.col("question_answer_tokens").alias("answer_tokens"),
    )
    lengths = frame.select(
        "n", pl.col("question_id").list.len().alias("ids"), pl.col("nll").list.len().alias("values")
    ).filter(pl.col("ids") != pl.col("values"))
    if lengths.height:
        n, ids, values = lengths.row(0)
        raise dg.Failure(
            f"eval.stage1_test_nll n={n}: {ids} question ids but {values} per-question NLLs; "
            f"re-materialize stage1_test_nll[{n}]."
        )
    return frame.explode("question_id", "nll", "answer_tokens")


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"duckdb", "polars"},
    metadata=table_metadata(OPTIMAL_SCALE_TABLE),
)
def optimal_scale(
    context: dg.AssetExecutionContext, stage1_scale_curve: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    """Stage 1's decision, n*: the n of the grid with the lowest stage-1 test NLL (ties go to the smaller
    n). One row, (model, n), and nothing else, so its data version changes exactly when n* does: that is
    what makes Dagster mark stage 2 stale, and the UI names this asset as the cause."""
    try:
        best = scaling.optimal_n(stage1_scale_curve)
    except scaling.ScaleCurveError as exc:
        raise dg.Failure(f"eval.scale_curve: {exc}; re-materialize stage1_scale_curve") from exc
    scaling.check_n_in_grid(best, current_profile().n_grid, what="optimal n")
    optimum = stage1_scale_curve.filter(pl.col("is_optimal")).row(0, named=True)
    frame = pl.DataFrame({"model": [str(optimum["model"])], "n": [best]}, schema={"model": pl.Utf8, "n": pl.Int64})
    context.log.info(f"n* = {best} for {optimum['model']} (test NLL {optimum['test_nll']:.4f})")
    return versioned_output(
        frame,
        optimal_n=best,
        model=str(optimum["model"]),
        test_nll=float(optimum["test_nll"]),
        grid=dg.MetadataValue.json(stage1_scale_curve["n"].to_list()),
    )


stage1_job = dg.define_asset_job(
    "stage1_scale_sweep",
    selection=dg.AssetSelection.assets(stage1_lora_adapter, stage1_test_nll),
    partitions_def=n_partitions(),
    description="Stage 1: adapters and test NLL of the reference model for one n (backfill over every n).",
)
