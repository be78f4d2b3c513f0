"""The training and evaluation stages' figures: loss curves and the test NLL over n (see ``figures`` for
what every renderer shares)."""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from jpslm_assets.common.figures import (
    FigureResult,
    FigureSpec,
    RenderSettings,
    Source,
    drawn_from,
    figure_style,
    finish_figure,
    new_figure,
    ordered_unique,
    require_columns,
)


@drawn_from("train.loss_curve")
def render_loss_curves(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    curve, table, rows = source.frame, source.table, source.rows
    require_columns(curve, table, ["model", "n", "step", "loss"], spec.key)
    # Stage 1 (scale search) and stage 2 (model comparison) may both train a model at the chosen n;
    # they are separate curves, stage 2 drawn dashed.
    if "stage" not in curve.columns:
        curve = curve.with_columns(pl.lit(1).alias("stage"))
    curve = curve.drop_nulls(["loss"]).sort("model", "n", "stage", "step")
    models = ordered_unique(curve["model"].to_list())
    sizes = sorted(curve["n"].unique().to_list())
    multi_stage = curve["stage"].n_unique() > 1
    columns = min(len(models), 3)
    lines = math.ceil(len(models) / columns)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    with figure_style():
        figure = new_figure(5.0 * columns, 3.6 * lines)
        for index, model in enumerate(models, start=1):
            axes = figure.add_subplot(lines, columns, index)
            for (n, stage), part in curve.filter(pl.col("model") == model).group_by(
                "n", "stage", maintain_order=True
            ):
                color = cmap(sizes.index(n) / max(len(sizes) - 1, 1) * 0.85)
                stage_note = f" stage {stage}" if multi_stage else ""
                axes.plot(
                    part["step"].to_list(),
                    part["loss"].to_list(),
                    color=color,
                    linewidth=1.2,
                    linestyle="--" if stage and stage > 1 else "-",
                    label=f"n={n}{stage_note} (最終 {part['loss'][-1]:.3f})",
                )
            axes.set_title(str(model))
            axes.set_xlabel("ステップ (optimizer step)")
            axes.set_ylabel("学習損失 (loss)")
            axes.legend()
        stats = {"series": curve.select("model", "n", "stage").unique().height, "points": curve.height}
        return finish_figure(spec, figure, settings, rows, stats)


def optimal_rows(curve: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Per model, the row marked ``is_optimal`` by the evaluation stage, else the lowest test NLL."""
    best: dict[str, dict[str, Any]] = {}
    for (model,), part in curve.group_by("model", maintain_order=True):
        marked = (
            part.filter(pl.col("is_optimal").fill_null(False))
            if "is_optimal" in part.columns
            else part.head(0)
        )
        best[str(model)] = (marked if marked.height else part.sort("test_nll")).row(0, named=True)
    return best


@drawn_from("eval.scale_curve")
def render_nll_curve(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    curve, table, rows = source.frame, source.table, source.rows
    require_columns(curve, table, ["model", "n", "test_nll", "test_ppl"], spec.key)
    curve = curve.drop_nulls(["test_nll"]).sort("model", "n")
    models = ordered_unique(curve["model"].to_list())
    best = optimal_rows(curve)
    has_loss = "train_loss_final" in curve.columns
    # One column per model: NLL levels differ by model (vocabulary, pre-training), and a shared axis would
    # flatten every U-curve but the highest.
    with figure_style():
        figure = new_figure(max(5.0 * len(models), 7.0), 6.8)
        grid = figure.subplots(2, len(models), squeeze=False, sharex="col")
        for column, model in enumerate(models):
            part = curve.filter(pl.col("model") == model)
            sizes = part["n"].to_list()
            top, bottom = grid[0][column], grid[1][column]
            top.plot(sizes, part["test_nll"].to_list(), marker="o", color="#1f77b4", label="テストNLL")
            chosen = best[str(model)]
            top.scatter([chosen["n"]], [chosen["test_nll"]], marker="*", s=260, color="#d62728",
                        edgecolor="black", zorder=5, label=f"最適 n={chosen['n']}")  # fmt: skip
            if has_loss:
                loss = part.drop_nulls(["train_loss_final"])
                loss_axes = top.twinx()
                loss_axes.spines["right"].set_visible(True)
                loss_axes.plot(loss["n"].to_list(), loss["train_loss_final"].to_list(), linestyle="--",
                               marker=".", color="#7f7f7f", label="最終学習損失")  # fmt: skip
                loss_axes.set_ylabel("最終学習損失 (dashed)")
                handles, labels = top.get_legend_handles_labels()
                more_handles, more_labels = loss_axes.get_legend_handles_labels()
                top.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="best")
            else:
                top.legend(fontsize=7, loc="best")
            top.set_title(str(model))
            top.set_ylabel("テストNLL (answer tokens)")
            bottom.plot(sizes, part["test_ppl"].to_list(), marker="s", color="#2ca02c")
            bottom.set_ylabel("テスト perplexity")
            bottom.set_xlabel("学習データ数 n")
            bottom.set_xticks(sizes, [str(n) for n in sizes])
        stats = {"optimal_n": {model: int(row["n"]) for model, row in best.items()}}
        return finish_figure(spec, figure, settings, rows, stats)
