"""The dataset stage's figures: relation types in the graph and the QA pools, and the training subsets'
quality (see ``figures`` for what every renderer shares)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from jpslm_assets.common.figures import (
    FigureResult,
    FigureSpec,
    RenderSettings,
    Source,
    drawn_from,
    empty_reason,
    figure_style,
    finish_figure,
    new_figure,
    palette,
    placeholder_figure,
    require_columns,
    row_counts,
    table_frame,
)


def relation_type_shares(frame: pl.DataFrame, group: str | None = None) -> pl.DataFrame:
    """Count and share of each relation type (within each ``group`` value when given)."""
    keys = [group, "relation_type"] if group else ["relation_type"]
    counts = frame.group_by(keys).agg(pl.len().alias("count"))
    total = pl.col("count").sum().over(group) if group else pl.col("count").sum()
    return counts.with_columns((pl.col("count") / total).alias("share")).sort(keys)


def subset_quality_stats(subset: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Per-n quality of nested subsets: relation shares and their CV across n, answer length, categories.

    Returns frames ``shares`` (n, relation_type, count, share), ``share_cv`` (relation_type, mean_share,
    std_share, cv), ``answers`` (n, rows, avg_chars, std_chars) and ``categories`` (n, category, share).
    The CV uses the sample standard deviation across subset sizes (scipy-free: polars computes it).
    """
    chars = pl.col("answer_chars") if "answer_chars" in subset.columns else pl.col("answer").str.len_chars()
    shares = relation_type_shares(subset, "n")
    share_cv = (
        shares.group_by("relation_type")
        .agg(pl.col("share").mean().alias("mean_share"), pl.col("share").std(ddof=1).alias("std_share"))
        .with_columns((pl.col("std_share") / pl.col("mean_share")).fill_null(0.0).alias("cv"))
        .sort("relation_type")
    )
    answers = (
        subset.with_columns(chars.cast(pl.Float64).alias("_chars"))
        .group_by("n")
        .agg(
            pl.len().alias("rows"),
            pl.col("_chars").mean().alias("avg_chars"),
            pl.col("_chars").std(ddof=1).fill_null(0.0).alias("std_chars"),
        )
        .sort("n")
    )
    categories = (
        subset.group_by("n", "category")
        .agg(pl.len().alias("count"))
        .with_columns((pl.col("count") / pl.col("count").sum().over("n")).alias("share"))
        .sort("n", "category")
    )
    return {"shares": shares, "share_cv": share_cv, "answers": answers, "categories": categories}


def render_relation_types(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    relations, pool, rebalanced = (
        table_frame(frames, t) for t in ("kg.relations", "qa.pool", "qa.rebalanced_pool")
    )
    rows = row_counts(frames, spec.tables)
    if not (relations.height or pool.height or rebalanced.height):
        return placeholder_figure(spec, empty_reason(spec.tables), settings, rows)
    for table, frame in (("kg.relations", relations), ("qa.pool", pool), ("qa.rebalanced_pool", rebalanced)):
        if frame.height:
            require_columns(frame, table, ["relation_type"], spec.key)
    stats: dict[str, Any] = {}
    with figure_style():
        panels = int(relations.height > 0) + int(pool.height > 0 or rebalanced.height > 0)
        figure = new_figure(6.0 * panels, 4.6)
        index = 1
        if relations.height:
            counts = relation_type_shares(relations).sort("count")
            axes = figure.add_subplot(1, panels, index)
            index += 1
            axes.barh(counts["relation_type"].to_list(), counts["count"].to_list(), color="#4c72b0")
            for y, (count, share) in enumerate(zip(counts["count"], counts["share"], strict=True)):
                axes.text(count, y, f" {count} ({share:.1%})", va="center", fontsize=7)
            axes.set_xlabel("関係数 (relations in the graph)")
            axes.set_title(f"知識グラフ: {relations.height} 関係, {counts.height} 種類")
            axes.margins(x=0.25)
            stats["relation_types"] = counts.height
            stats["relations"] = relations.height
        if pool.height or rebalanced.height:
            axes = figure.add_subplot(1, panels, index)
            shares = {
                name: relation_type_shares(frame)
                for name, frame in (("QA pool", pool), ("rebalanced", rebalanced))
                if frame.height
            }
            types = sorted({t for frame in shares.values() for t in frame["relation_type"].to_list()})
            height = 0.8 / len(shares)
            for offset, (name, frame) in enumerate(shares.items()):
                lookup = dict(zip(frame["relation_type"], frame["share"], strict=True))
                ys = [i + offset * height for i in range(len(types))]
                values = [100.0 * lookup.get(t, 0.0) for t in types]
                total = (pool if name == "QA pool" else rebalanced).height
                axes.barh(ys, values, height=height, label=f"{name} ({total} QA)")
                stats[f"{name.replace(' ', '_').lower()}row_counts"] = total
            axes.set_yticks([i + 0.4 - height / 2 for i in range(len(types))], types)
            axes.set_xlabel("割合 % (share of QA pairs)")
            axes.set_title("QAペアの関係タイプ構成")
            axes.legend(loc="lower right")
        return finish_figure(spec, figure, settings, rows, stats)


@drawn_from("qa.training_subset")
def render_subset_quality(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    subset, table, rows = source.frame, source.table, source.rows
    needed = ["n", "relation_type", "category"]
    needed.append("answer_chars" if "answer_chars" in subset.columns else "answer")
    require_columns(subset, table, needed, spec.key)
    quality = subset_quality_stats(subset)
    sizes = quality["answers"]["n"].to_list()
    max_cv = float(quality["share_cv"]["cv"].max() or 0.0)  # type: ignore[arg-type]
    worst = quality["share_cv"].sort("cv", descending=True).row(0, named=True)["relation_type"]
    with figure_style():
        figure = new_figure(15.0, 4.8)
        grid = figure.subplots(1, 3)
        shares = quality["shares"]
        types = sorted(shares["relation_type"].unique().to_list())
        colors = palette(len(types))
        positions = list(range(len(sizes)))
        bottoms = [0.0] * len(sizes)
        for color, relation_type in zip(colors, types, strict=True):
            lookup = dict(
                zip(
                    *shares.filter(pl.col("relation_type") == relation_type).select("n", "share"), strict=True
                )
            )
            values = [100.0 * lookup.get(n, 0.0) for n in sizes]
            grid[0].bar(positions, values, bottom=bottoms, color=color, label=relation_type)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        grid[0].set_xticks(positions, [str(n) for n in sizes])
        grid[0].set_xlabel("サブセットの大きさ n")
        grid[0].set_ylabel("関係タイプの割合 %")
        grid[0].set_title(f"関係タイプ構成 (max CV {max_cv:.1%}: {worst})")
        grid[0].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        answers = quality["answers"]
        grid[1].errorbar(
            positions,
            answers["avg_chars"].to_list(),
            yerr=answers["std_chars"].to_list(),
            marker="o",
            capsize=4,
            color="#4c72b0",
        )
        for x, value in zip(positions, answers["avg_chars"], strict=True):
            grid[1].annotate(
                f"{value:.0f}", (x, value), textcoords="offset points", xytext=(6, 6), fontsize=8
            )
        grid[1].set_xticks(positions, [str(n) for n in sizes])
        grid[1].set_xlabel("サブセットの大きさ n")
        grid[1].set_ylabel("平均回答文字数 (± 標準偏差)")
        grid[1].set_title("回答の長さ")
        categories = quality["categories"]
        for color, category in zip(
            palette(categories["category"].n_unique()),
            sorted(categories["category"].unique().to_list()),
            strict=True,
        ):
            lookup = dict(
                zip(*categories.filter(pl.col("category") == category).select("n", "share"), strict=True)
            )
            grid[2].plot(
                positions,
                [100.0 * lookup.get(n, 0.0) for n in sizes],
                marker="o",
                color=color,
                label=category,
            )
        grid[2].set_xticks(positions, [str(n) for n in sizes])
        grid[2].set_xlabel("サブセットの大きさ n")
        grid[2].set_ylabel("カテゴリの割合 %")
        grid[2].set_title("カテゴリの網羅")
        grid[2].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        stats = {
            "subset_sizes": sizes,
            "max_relation_share_cv": round(max_cv, 5),
            "avg_answer_chars": [round(v, 1) for v in answers["avg_chars"].to_list()],
        }
        return finish_figure(spec, figure, settings, rows, stats)
