"""The judging stage's figures: scores per model, their distribution, per category, the radar and the
per-question scatter (see ``figures`` for what every renderer shares)."""

from __future__ import annotations

import math
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
    ordered_unique,
    palette,
    placeholder_figure,
    require_columns,
    row_counts,
    series_columns,
    share_to_percent,
    table_frame,
    with_series_label,
)

SCORES = (3, 2, 1, 0)


def score_stability(distribution: pl.DataFrame) -> pl.DataFrame:
    """Per series (model, n, format[, judge]): mean and standard deviation of the score from the counts."""
    keys = series_columns(distribution)
    return (
        distribution.with_columns(pl.col("score").cast(pl.Float64), pl.col("count").cast(pl.Float64))
        .group_by(keys)
        .agg(
            (pl.col("score") * pl.col("count")).sum().alias("_sum"),
            (pl.col("score") ** 2 * pl.col("count")).sum().alias("_sumsq"),
            pl.col("count").sum().alias("questions"),
        )
        .filter(pl.col("questions") > 0)
        .with_columns((pl.col("_sum") / pl.col("questions")).alias("mean_score"))
        .with_columns(
            (pl.col("_sumsq") / pl.col("questions") - pl.col("mean_score") ** 2)
            .clip(lower_bound=0.0)
            .sqrt()
            .alias("std_score")
        )
        .drop("_sum", "_sumsq")
        .sort(keys)
    )


def radar_axes(summary: pl.DataFrame, distribution: pl.DataFrame | None) -> pl.DataFrame:
    """The five radar axes per series, each scaled to 0..1 (1 = best among the series shown)."""
    frame = with_series_label(summary)
    frame = frame.with_columns(
        (pl.col("avg_score").cast(pl.Float64) / 3.0).alias("score_axis"),
        pl.col("perfect_rate").cast(pl.Float64).alias("perfect_axis"),
    )
    shortest = frame["avg_chars"].drop_nulls().filter(frame["avg_chars"].drop_nulls() > 0).min()
    fastest = frame["sec_per_question"].drop_nulls().filter(frame["sec_per_question"].drop_nulls() > 0).min()
    frame = frame.with_columns(
        (pl.lit(shortest, dtype=pl.Float64) / pl.col("avg_chars")).alias("concise_axis")
        if shortest is not None
        else pl.lit(None, dtype=pl.Float64).alias("concise_axis"),
        (pl.lit(fastest, dtype=pl.Float64) / pl.col("sec_per_question")).alias("speed_axis")
        if fastest is not None
        else pl.lit(None, dtype=pl.Float64).alias("speed_axis"),
    )
    if distribution is not None and distribution.height:
        keys = [c for c in series_columns(distribution) if c in frame.columns]
        stability = score_stability(distribution.select(*keys, "score", "count")).select(
            *keys, (1.0 - pl.col("std_score") / 1.5).clip(0.0, 1.0).alias("stability_axis")
        )
        frame = frame.join(stability, on=keys, how="left")
    else:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("stability_axis"))
    axes = ["score_axis", "perfect_axis", "concise_axis", "speed_axis", "stability_axis"]
    return frame.select("series", *[pl.col(a).cast(pl.Float64).clip(0.0, 1.0) for a in axes])


@drawn_from("marts.score_summary")
def render_model_comparison(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    summary, table, rows = source.frame, source.table, source.rows
    require_columns(
        summary,
        table,
        ["model", "n", "format", "avg_score", "perfect_rate", "avg_chars", "sec_per_question"],
        spec.key,
    )
    summary = with_series_label(summary, exclude=["format"], name="group")
    groups = ordered_unique(summary["group"].to_list())
    formats = ordered_unique(summary["format"].to_list())
    colors = dict(zip(formats, palette(len(formats)), strict=True))
    has_ci = {"ci_low", "ci_high"} <= set(summary.columns)
    panels = [
        ("avg_score", "平均スコア (0-3)", "{:.2f}"),
        ("perfect_rate", "満点率 % (score 3)", "{:.0f}"),
        ("avg_chars", "平均回答文字数", "{:.0f}"),
        ("sec_per_question", "1問あたり秒数", "{:.2f}"),
    ]
    summary = summary.with_columns(share_to_percent(summary["perfect_rate"]).alias("perfect_rate"))
    width = 0.8 / len(formats)
    with figure_style():
        figure = new_figure(max(9.0, 2.2 * len(groups) + 4), 7.2)
        grid = figure.subplots(2, 2)
        for axes, (column, label, fmt) in zip(grid.flat, panels, strict=True):
            for offset, fmt_name in enumerate(formats):
                part = summary.filter(pl.col("format") == fmt_name)
                lookup = {r["group"]: r for r in part.iter_rows(named=True)}
                xs = [
                    i + (offset - (len(formats) - 1) / 2) * width for i, g in enumerate(groups) if g in lookup
                ]
                present = [g for g in groups if g in lookup]
                values = [float(lookup[g][column]) if lookup[g][column] is not None else 0.0 for g in present]
                yerr = None
                if column == "avg_score" and has_ci:
                    lows = [lookup[g]["ci_low"] for g in present]
                    highs = [lookup[g]["ci_high"] for g in present]
                    yerr = [
                        [
                            max(v - lo, 0.0) if lo is not None else 0.0
                            for v, lo in zip(values, lows, strict=True)
                        ],
                        [
                            max(hi - v, 0.0) if hi is not None else 0.0
                            for v, hi in zip(values, highs, strict=True)
                        ],
                    ]
                bars = axes.bar(
                    xs,
                    values,
                    width=width,
                    color=colors[fmt_name],
                    label=str(fmt_name).upper(),
                    yerr=yerr,
                    capsize=4 if yerr else 0,
                    error_kw={"elinewidth": 1},
                )
                axes.bar_label(bars, [fmt.format(v) for v in values], fontsize=7, padding=2)
            axes.set_xticks(range(len(groups)), groups, rotation=15 if len(groups) > 3 else 0)
            axes.set_title(label)
            if column == "perfect_rate":
                axes.set_ylim(0, 105)
            if column == "avg_score":
                axes.set_ylim(0, 3.3)
                if has_ci:
                    axes.set_title(label + "  (誤差棒 = 信頼区間)")
            axes.margins(y=0.15)
        grid.flat[0].legend(title="format")
        stats: dict[str, Any] = {"series": summary.height, "confidence_intervals": has_ci}
        verdicts = judge_verdicts(summary)
        if verdicts:
            # The judge's validity beside its averages: a judge without signal makes every bar meaningless.
            figure.suptitle("判定者の妥当性 (judge validity): " + verdicts, fontsize=9)
            stats["judge_verdicts"] = verdicts
        return finish_figure(spec, figure, settings, rows, stats)


def judge_verdicts(summary: pl.DataFrame) -> str:
    """``judge: verdict`` for each judge of a score table with a ``judge_verdict`` column ("" without one)."""
    if "judge_verdict" not in summary.columns or "judge" not in summary.columns:
        return ""
    pairs = summary.select("judge", "judge_verdict").unique().sort("judge").iter_rows()
    return "; ".join(f"{judge}: {verdict or 'not measured'}" for judge, verdict in pairs)


@drawn_from("marts.score_distribution")
def render_score_distribution(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    dist, table, rows = source.frame, source.table, source.rows
    require_columns(dist, table, ["model", "n", "format", "score", "count"], spec.key)
    dist = with_series_label(dist.filter(pl.col("score").is_not_null()))
    labels = ordered_unique(dist["series"].to_list())
    totals = {
        r["series"]: r["count"]
        for r in dist.group_by("series").agg(pl.col("count").sum()).iter_rows(named=True)
    }
    with figure_style():
        figure = new_figure(9.0, 1.0 + 0.55 * len(labels) + 1.2)
        axes = figure.add_subplot()
        lefts = [0.0] * len(labels)
        ys = list(range(len(labels)))[::-1]
        for score in SCORES:
            part = dist.filter(pl.col("score").cast(pl.Int64) == score)
            lookup = dict(zip(part["series"], part["count"], strict=True))
            counts = [int(lookup.get(label, 0)) for label in labels]
            shares = [
                100.0 * c / totals[label] if totals[label] else 0.0
                for c, label in zip(counts, labels, strict=True)
            ]
            bars = axes.barh(
                ys, shares, left=lefts, color=settings.score_colors[str(score)], label=f"スコア {score}"
            )
            axes.bar_label(
                bars,
                [str(c) if s >= 4 else "" for c, s in zip(counts, shares, strict=True)],
                label_type="center",
                fontsize=7,
                color="white",
            )
            lefts = [left + s for left, s in zip(lefts, shares, strict=True)]
        axes.set_yticks(ys, [f"{label} ({totals[label]}問)" for label in labels])
        axes.set_xlim(0, 100)
        axes.set_xlabel("質問の割合 % (件数はバー内)")
        axes.legend(ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(labels) < 4 else -0.1))
        return finish_figure(spec, figure, settings, rows, {"series": len(labels)})


@drawn_from("marts.category_scores")
def render_category_heatmap(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    scores, table, rows = source.frame, source.table, source.rows
    require_columns(scores, table, ["model", "n", "format", "category", "avg_score"], spec.key)
    scores = with_series_label(scores)
    labels = ordered_unique(scores["series"].to_list())
    categories = sorted(scores["category"].drop_nulls().unique().to_list())
    lookup = {(r["series"], r["category"]): r["avg_score"] for r in scores.iter_rows(named=True)}
    matrix = [[lookup.get((label, c)) for c in categories] for label in labels]
    import numpy as np

    values = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix])
    with figure_style():
        figure = new_figure(max(7.0, 1.1 * len(categories) + 3), 1.6 + 0.5 * len(labels) + 1.4)
        axes = figure.add_subplot()
        image = axes.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=3.0, aspect="auto")
        for i in range(len(labels)):
            for j in range(len(categories)):
                if not math.isnan(values[i, j]):
                    axes.text(
                        j,
                        i,
                        f"{values[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if 0.8 < values[i, j] < 2.6 else "white",
                    )
        axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        for spine in axes.spines.values():
            spine.set_visible(False)
        figure.colorbar(image, ax=axes, label="平均スコア (0-3)", shrink=0.9)
        stats = {"series": len(labels), "categories": len(categories)}
        return finish_figure(spec, figure, settings, rows, stats)


RADAR_LABELS = ("平均スコア", "満点率", "簡潔さ", "速度", "安定性")


def render_radar(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    summary_table, dist_table = "marts.score_summary", "marts.score_distribution"
    summary = table_frame(frames, summary_table)
    rows = row_counts(frames, spec.tables)
    if not summary.height:
        return placeholder_figure(spec, empty_reason([summary_table]), settings, rows)
    require_columns(
        summary,
        summary_table,
        ["model", "n", "format", "avg_score", "perfect_rate", "avg_chars", "sec_per_question"],
        spec.key,
    )
    dist = table_frame(frames, dist_table)
    if dist.height:
        require_columns(dist, dist_table, ["model", "n", "format", "score", "count"], spec.key)
    axes_frame = radar_axes(summary, dist if dist.height else None)
    angles = [2 * math.pi * i / len(RADAR_LABELS) for i in range(len(RADAR_LABELS))]
    with figure_style():
        figure = new_figure(7.5, 6.6 + 0.15 * axes_frame.height)
        axes = figure.add_subplot(projection="polar")
        for color, row in zip(palette(axes_frame.height), axes_frame.iter_rows(named=True), strict=True):
            values = [
                row[c] if row[c] is not None else 0.0
                for c in ("score_axis", "perfect_axis", "concise_axis", "speed_axis", "stability_axis")
            ]
            axes.plot(
                [*angles, angles[0]], [*values, values[0]], color=color, linewidth=1.5, label=row["series"]
            )
            axes.fill([*angles, angles[0]], [*values, values[0]], color=color, alpha=0.12)
        axes.set_xticks(angles, list(RADAR_LABELS))
        axes.set_ylim(0, 1.0)
        axes.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], fontsize=7)
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2)
        stats = {"series": axes_frame.height, "stability_from_distribution": bool(dist.height)}
        return finish_figure(spec, figure, settings, rows, stats)


@drawn_from("eval.judge_scores")
def render_question_scatter(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    scores, table, rows = source.frame, source.table, source.rows
    require_columns(scores, table, ["model", "n", "format", "question_id", "score"], spec.key)
    scores = with_series_label(scores)
    labels = ordered_unique(scores["series"].to_list())
    questions = sorted(scores["question_id"].cast(pl.String).unique().to_list())
    position = {q: i for i, q in enumerate(questions)}
    spread = 0.3
    unparsed: dict[str, int] = {}
    with figure_style():
        figure = new_figure(max(9.0, 0.09 * len(questions) + 5), 4.8)
        axes = figure.add_subplot()
        for rank, (color, label) in enumerate(zip(palette(len(labels)), labels, strict=True)):
            part = scores.filter(pl.col("series") == label)
            parsed = part.filter(pl.col("score").is_not_null())
            unparsed[label] = part.height - parsed.height
            # A fixed offset per series (not random jitter) keeps the figure identical between runs.
            offset = (rank - (len(labels) - 1) / 2) * (spread / max(len(labels), 1))
            xs = [position[str(q)] for q in parsed["question_id"].cast(pl.String).to_list()]
            ys = [float(s) + offset for s in parsed["score"].to_list()]
            mean = float(parsed["score"].mean()) if parsed.height else math.nan  # type: ignore[arg-type]
            note = f", 判定不能 {unparsed[label]}" if unparsed[label] else ""
            axes.scatter(xs, ys, s=14, color=color, alpha=0.8, label=f"{label} (平均 {mean:.2f}{note})")
            if parsed.height:
                axes.axhline(mean, color=color, linestyle="--", linewidth=1)
        axes.set_yticks(list(SCORES)[::-1], [str(s) for s in list(SCORES)[::-1]])
        axes.set_ylim(-0.5, 3.5)
        axes.set_xlabel(f"質問 (question, {len(questions)}問)")
        axes.set_ylabel("判定スコア (judge score)")
        if len(questions) <= 30:
            axes.set_xticks(range(len(questions)), questions, rotation=90, fontsize=6)
        axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        stats = {"questions": len(questions), "series": len(labels), "unparsed": sum(unparsed.values())}
        return finish_figure(spec, figure, settings, rows, stats)
