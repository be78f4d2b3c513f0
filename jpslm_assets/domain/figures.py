"""The report figures, rendered with matplotlib from polars frames of the DuckDB tables.

Every renderer takes ``{table name: frame}`` and returns a :class:`FigureResult` holding PNG bytes. An empty
or missing table gives a placeholder image that says which table is empty and what to materialize, never an
exception; a table that lacks a column the figure needs raises :class:`FigureInputError` naming both.

Rendering uses matplotlib's object API on the Agg canvas (no pyplot, no global backend switch) and the
IPAexGothic font shipped inside the ``japanize_matplotlib`` package, loaded by file path, so Japanese
labels render the same on every machine whatever fonts the system has. matplotlib is imported inside
functions: importing this module stays cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import yaml
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCORES = (3, 2, 1, 0)


class FigureInputError(ValueError):
    """A source table lacks what a figure needs; the message names the table, the columns and the fix."""


class FontError(RuntimeError):
    """The Japanese font cannot be loaded."""


class FigureSpec(BaseModel):
    key: str
    title: str
    caption: str
    tables: list[str] = Field(min_length=1)


class RenderSettings(BaseModel):
    dpi: int = Field(default=100, ge=50, le=300)
    score_colors: dict[str, str]


class FigureCatalogue(BaseModel):
    render: RenderSettings
    figures: dict[str, FigureSpec]
    # Tables an asset fills besides its own table (no metadata names them): table -> writer asset keys.
    secondary_tables: dict[str, list[str]] = Field(default_factory=dict)


@lru_cache(maxsize=1)
def load_figure_catalogue() -> FigureCatalogue:
    """The figure list from ``jpslm_assets/data/reports.yaml``, checked against the renderers."""
    text = (resources.files("jpslm_assets") / "data" / "reports.yaml").read_text("utf-8")
    raw = yaml.safe_load(text)
    figures = {key: FigureSpec(key=key, **entry) for key, entry in raw["figures"].items()}
    unknown = sorted(set(figures) - set(RENDERERS))
    if unknown:
        raise ValueError(
            f"reports.yaml lists figure(s) {unknown} with no renderer in jpslm_assets/domain/figures.py;"
            f" known renderers: {sorted(RENDERERS)}"
        )
    return FigureCatalogue(
        render=RenderSettings(**raw["render"]),
        figures=figures,
        secondary_tables=raw.get("secondary_tables") or {},
    )


@dataclass(frozen=True)
class FigureResult:
    """One rendered figure. ``placeholder_reason`` is set when there was no data to draw."""

    key: str
    title: str
    png: bytes
    width_px: int
    height_px: int
    source_rows: dict[str, int]
    placeholder_reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def is_placeholder(self) -> bool:
        return self.placeholder_reason is not None


# --------------------------------------------------------------------------------------------- font + canvas


def japanese_font_path() -> Path:
    """IPAexGothic inside the installed ``japanize_matplotlib`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("japanize_matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise FontError(
            "the Japanese font comes from the 'japanize-matplotlib' package, which is not installed: "
            "pip install japanize-matplotlib"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "fonts" / "ipaexg.ttf"
    if not path.is_file():
        raise FontError(f"font file {path} is missing; reinstall japanize-matplotlib")
    return path


@lru_cache(maxsize=1)
def japanese_font_name() -> str:
    """Register the shipped font with matplotlib by path and return its family name."""
    from matplotlib import font_manager

    path = japanese_font_path()
    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


def missing_glyphs(text: str) -> set[str]:
    """Characters of ``text`` the Japanese font has no glyph for (used by tests and label checks)."""
    from matplotlib.ft2font import FT2Font

    charmap = FT2Font(str(japanese_font_path())).get_charmap()
    return {char for char in text if not char.isspace() and ord(char) not in charmap}


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(
        {
            "font.family": [japanese_font_name(), "DejaVu Sans"],
            # IPAexGothic draws the ASCII hyphen well; the Unicode minus looks odd next to it.
            "axes.unicode_minus": False,
            "axes.titlesize": 11,
            "axes.labelsize": 9,
            "xtick.labelsize": 8,
            "ytick.labelsize": 8,
            "legend.fontsize": 8,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    ):
        yield


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure, dpi: int) -> tuple[bytes, int, int]:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    width, height = (int(v + 0.5) for v in figure.get_size_inches() * dpi)
    return buffer.getvalue(), width, height


def _finish(
    spec: FigureSpec,
    figure: Figure,
    settings: RenderSettings,
    source_rows: dict[str, int],
    stats: dict[str, Any] | None = None,
) -> FigureResult:
    figure.suptitle(spec.title, fontsize=13)
    png, width, height = _png(figure, settings.dpi)
    return FigureResult(spec.key, spec.title, png, width, height, source_rows, None, stats or {})


def placeholder_figure(
    spec: FigureSpec, reason: str, settings: RenderSettings, source_rows: dict[str, int]
) -> FigureResult:
    """An image that says there is nothing to draw yet, and why."""
    import textwrap

    with _style():
        figure = _new_figure(7.5, 2.6)
        axes = figure.add_subplot()
        axes.set_axis_off()
        wrapped = "\n".join(textwrap.wrap(reason, 90))
        axes.text(
            0.5,
            0.62,
            "データがまだありません (no data yet)",
            ha="center",
            va="center",
            fontsize=13,
            color="#555555",
            transform=axes.transAxes,
        )
        axes.text(
            0.5,
            0.28,
            wrapped,
            ha="center",
            va="center",
            fontsize=9,
            color="#333333",
            transform=axes.transAxes,
        )
        figure.suptitle(spec.title, fontsize=13)
        png, width, height = _png(figure, settings.dpi)
    return FigureResult(spec.key, spec.title, png, width, height, source_rows, reason, {})


# ------------------------------------------------------------------------------------------ input handling


def require_columns(frame: pl.DataFrame, table: str, columns: Sequence[str], figure: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise FigureInputError(
            f"figure {figure!r}: table {table} lacks column(s) {missing} (it has {frame.columns}). "
            f"Re-materialize the asset that writes {table} with the current code, or fix its schema."
        )


def _frame(frames: Mapping[str, pl.DataFrame | None], table: str) -> pl.DataFrame:
    frame = frames.get(table)
    return frame if frame is not None else pl.DataFrame()


def _empty_reason(tables: Sequence[str]) -> str:
    names = ", ".join(tables)
    return (
        f"table(s) {names} are empty or missing in the DuckDB file. Materialize the assets that write "
        f"them (see docs/architecture.md), then re-materialize this figure."
    )


SERIES_COLUMNS = ("model", "n", "format", "judge")


def series_columns(frame: pl.DataFrame) -> list[str]:
    """The identifying columns of a score table that this frame has (the marts add ``judge``)."""
    return [column for column in SERIES_COLUMNS if column in frame.columns]


def series_label(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    """``model``, plus ``n=``, the format and the judge only where they vary between series."""
    parts = [str(row["model"])]
    if "n" in varying and row.get("n") is not None:
        parts.append(f"n={row['n']}")
    if "format" in varying and row.get("format") is not None:
        parts.append(str(row["format"]).upper())
    if "judge" in varying and row.get("judge") is not None:
        parts.append(f"[{row['judge']}]")
    return " ".join(parts)


def with_series_label(frame: pl.DataFrame, exclude: Sequence[str] = (), name: str = "series") -> pl.DataFrame:
    """Add a label column (model / n / format / judge) and sort so legends read the same in every figure.

    ``exclude`` leaves a column out of the label, e.g. the format when it is shown as the bar colour.
    """
    keys = series_columns(frame)
    varying = [c for c in keys if c != "model" and c not in exclude and frame[c].n_unique() > 1]
    frame = frame.sort(keys)
    labels = [series_label(row, varying) for row in frame.iter_rows(named=True)]
    return frame.with_columns(pl.Series(name, labels, dtype=pl.String))


def _ordered_unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def share_to_percent(values: pl.Series) -> pl.Series:
    """The marts store rates as shares (0..1, e.g. ``perfect_rate``); figures show percents."""
    return values.cast(pl.Float64) * 100.0


def _palette(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if count <= 10 else colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


# ---------------------------------------------------------------------------------------------- statistics


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


# ----------------------------------------------------------------------------------------------- renderers

Renderer = Callable[[FigureSpec, Mapping[str, pl.DataFrame | None], RenderSettings], FigureResult]


def _rows(frames: Mapping[str, pl.DataFrame | None], tables: Sequence[str]) -> dict[str, int]:
    return {table: _frame(frames, table).height for table in tables}


def render_relation_types(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    relations, pool, rebalanced = (
        _frame(frames, t) for t in ("kg.relations", "qa.pool", "qa.rebalanced_pool")
    )
    rows = _rows(frames, spec.tables)
    if not (relations.height or pool.height or rebalanced.height):
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    for table, frame in (("kg.relations", relations), ("qa.pool", pool), ("qa.rebalanced_pool", rebalanced)):
        if frame.height:
            require_columns(frame, table, ["relation_type"], spec.key)
    stats: dict[str, Any] = {}
    with _style():
        panels = int(relations.height > 0) + int(pool.height > 0 or rebalanced.height > 0)
        figure = _new_figure(6.0 * panels, 4.6)
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
                stats[f"{name.replace(' ', '_').lower()}_rows"] = total
            axes.set_yticks([i + 0.4 - height / 2 for i in range(len(types))], types)
            axes.set_xlabel("割合 % (share of QA pairs)")
            axes.set_title("QAペアの関係タイプ構成")
            axes.legend(loc="lower right")
        return _finish(spec, figure, settings, rows, stats)


def render_subset_quality(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "qa.training_subset"
    subset = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not subset.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    needed = ["n", "relation_type", "category"]
    needed.append("answer_chars" if "answer_chars" in subset.columns else "answer")
    require_columns(subset, table, needed, spec.key)
    quality = subset_quality_stats(subset)
    sizes = quality["answers"]["n"].to_list()
    max_cv = float(quality["share_cv"]["cv"].max() or 0.0)  # type: ignore[arg-type]
    worst = quality["share_cv"].sort("cv", descending=True).row(0, named=True)["relation_type"]
    with _style():
        figure = _new_figure(15.0, 4.8)
        grid = figure.subplots(1, 3)
        shares = quality["shares"]
        types = sorted(shares["relation_type"].unique().to_list())
        colors = _palette(len(types))
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
            _palette(categories["category"].n_unique()),
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
        return _finish(spec, figure, settings, rows, stats)


def render_loss_curves(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "train.loss_curve"
    curve = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not curve.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    require_columns(curve, table, ["model", "n", "step", "loss"], spec.key)
    # Stage 1 (scale search) and stage 2 (model comparison) may both train a model at the chosen n;
    # they are separate curves, stage 2 drawn dashed.
    if "stage" not in curve.columns:
        curve = curve.with_columns(pl.lit(1).alias("stage"))
    curve = curve.drop_nulls(["loss"]).sort("model", "n", "stage", "step")
    models = _ordered_unique(curve["model"].to_list())
    sizes = sorted(curve["n"].unique().to_list())
    multi_stage = curve["stage"].n_unique() > 1
    columns = min(len(models), 3)
    lines = math.ceil(len(models) / columns)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    with _style():
        figure = _new_figure(5.0 * columns, 3.6 * lines)
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
        return _finish(spec, figure, settings, rows, stats)


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


def render_nll_curve(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "eval.scale_curve"
    curve = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not curve.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    require_columns(curve, table, ["model", "n", "test_nll", "test_ppl"], spec.key)
    curve = curve.drop_nulls(["test_nll"]).sort("model", "n")
    models = _ordered_unique(curve["model"].to_list())
    best = optimal_rows(curve)
    has_loss = "train_loss_final" in curve.columns
    # One column per model: NLL levels differ by model (vocabulary, pre-training), and a shared axis would
    # flatten every U-curve but the highest.
    with _style():
        figure = _new_figure(max(5.0 * len(models), 7.0), 6.8)
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
        return _finish(spec, figure, settings, rows, stats)


def render_model_comparison(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "marts.score_summary"
    summary = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not summary.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    require_columns(
        summary,
        table,
        ["model", "n", "format", "avg_score", "perfect_rate", "avg_chars", "sec_per_question"],
        spec.key,
    )
    summary = with_series_label(summary, exclude=["format"], name="group")
    groups = _ordered_unique(summary["group"].to_list())
    formats = _ordered_unique(summary["format"].to_list())
    colors = dict(zip(formats, _palette(len(formats)), strict=True))
    has_ci = {"ci_low", "ci_high"} <= set(summary.columns)
    panels = [
        ("avg_score", "平均スコア (0-3)", "{:.2f}"),
        ("perfect_rate", "満点率 % (score 3)", "{:.0f}"),
        ("avg_chars", "平均回答文字数", "{:.0f}"),
        ("sec_per_question", "1問あたり秒数", "{:.2f}"),
    ]
    summary = summary.with_columns(share_to_percent(summary["perfect_rate"]).alias("perfect_rate"))
    width = 0.8 / len(formats)
    with _style():
        figure = _new_figure(max(9.0, 2.2 * len(groups) + 4), 7.2)
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
        return _finish(spec, figure, settings, rows, stats)


def judge_verdicts(summary: pl.DataFrame) -> str:
    """``judge: verdict`` for each judge of a score table with a ``judge_verdict`` column ("" without one)."""
    if "judge_verdict" not in summary.columns or "judge" not in summary.columns:
        return ""
    pairs = summary.select("judge", "judge_verdict").unique().sort("judge").iter_rows()
    return "; ".join(f"{judge}: {verdict or 'not measured'}" for judge, verdict in pairs)


def render_score_distribution(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "marts.score_distribution"
    dist = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not dist.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    require_columns(dist, table, ["model", "n", "format", "score", "count"], spec.key)
    dist = with_series_label(dist.filter(pl.col("score").is_not_null()))
    labels = _ordered_unique(dist["series"].to_list())
    totals = {
        r["series"]: r["count"]
        for r in dist.group_by("series").agg(pl.col("count").sum()).iter_rows(named=True)
    }
    with _style():
        figure = _new_figure(9.0, 1.0 + 0.55 * len(labels) + 1.2)
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
        return _finish(spec, figure, settings, rows, {"series": len(labels)})


def render_category_heatmap(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "marts.category_scores"
    scores = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not scores.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    require_columns(scores, table, ["model", "n", "format", "category", "avg_score"], spec.key)
    scores = with_series_label(scores)
    labels = _ordered_unique(scores["series"].to_list())
    categories = sorted(scores["category"].drop_nulls().unique().to_list())
    lookup = {(r["series"], r["category"]): r["avg_score"] for r in scores.iter_rows(named=True)}
    matrix = [[lookup.get((label, c)) for c in categories] for label in labels]
    import numpy as np

    values = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix])
    with _style():
        figure = _new_figure(max(7.0, 1.1 * len(categories) + 3), 1.6 + 0.5 * len(labels) + 1.4)
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
        return _finish(spec, figure, settings, rows, {"series": len(labels), "categories": len(categories)})


RADAR_LABELS = ("平均スコア", "満点率", "簡潔さ", "速度", "安定性")


def render_radar(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    summary_table, dist_table = "marts.score_summary", "marts.score_distribution"
    summary = _frame(frames, summary_table)
    rows = _rows(frames, spec.tables)
    if not summary.height:
        return placeholder_figure(spec, _empty_reason([summary_table]), settings, rows)
    require_columns(
        summary,
        summary_table,
        ["model", "n", "format", "avg_score", "perfect_rate", "avg_chars", "sec_per_question"],
        spec.key,
    )
    dist = _frame(frames, dist_table)
    if dist.height:
        require_columns(dist, dist_table, ["model", "n", "format", "score", "count"], spec.key)
    axes_frame = radar_axes(summary, dist if dist.height else None)
    angles = [2 * math.pi * i / len(RADAR_LABELS) for i in range(len(RADAR_LABELS))]
    with _style():
        figure = _new_figure(7.5, 6.6 + 0.15 * axes_frame.height)
        axes = figure.add_subplot(projection="polar")
        for color, row in zip(_palette(axes_frame.height), axes_frame.iter_rows(named=True), strict=True):
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
        return _finish(spec, figure, settings, rows, stats)


def render_question_scatter(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "eval.judge_scores"
    scores = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not scores.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    require_columns(scores, table, ["model", "n", "format", "question_id", "score"], spec.key)
    scores = with_series_label(scores)
    labels = _ordered_unique(scores["series"].to_list())
    questions = sorted(scores["question_id"].cast(pl.String).unique().to_list())
    position = {q: i for i, q in enumerate(questions)}
    spread = 0.3
    unparsed: dict[str, int] = {}
    with _style():
        figure = _new_figure(max(9.0, 0.09 * len(questions) + 5), 4.8)
        axes = figure.add_subplot()
        for rank, (color, label) in enumerate(zip(_palette(len(labels)), labels, strict=True)):
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
        return _finish(spec, figure, settings, rows, stats)


QUANTIZATION_COLUMNS = [
    "model",
    "n",
    "f16_avg",
    "q4_avg",
    "delta",
    "p_value",
    "significant",
    "speedup",
    "size_ratio",
]


def _number(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return pattern.format(value)


@dataclass(frozen=True)
class QuantizationTable:
    headers: list[str]
    rows: list[list[str]]
    deltas: list[float | None]


def quantization_table(frame: pl.DataFrame) -> QuantizationTable:
    """Formatted F16 vs Q4_K_M table (shared by the figure and the HTML report).

    The paired bootstrap interval of the delta is shown when the mart has it (``delta_ci_low`` /
    ``delta_ci_high``), and the judge when more than one judge scored.
    """
    with_ci = {"delta_ci_low", "delta_ci_high"} <= set(frame.columns)
    with_judge = "judge" in frame.columns and frame["judge"].n_unique() > 1
    headers = ["model", "n"] + (["judge"] if with_judge else []) + ["F16 平均", "Q4 平均", "差 Δ"]
    headers += (["Δ 95% 区間"] if with_ci else []) + ["p値", "有意", "速度比", "サイズ比"]
    rows, deltas = [], []
    for row in frame.sort(series_columns(frame)).iter_rows(named=True):
        cells = [str(row["model"]), str(row["n"])] + ([str(row["judge"])] if with_judge else [])
        cells += [
            _number(row["f16_avg"], "{:.3f}"),
            _number(row["q4_avg"], "{:.3f}"),
            _number(row["delta"], "{:+.3f}"),
        ]
        if with_ci:
            low, high = row["delta_ci_low"], row["delta_ci_high"]
            cells.append("—" if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]")
        significant = row["significant"]
        cells += [
            _number(row["p_value"], "{:.3f}"),
            "—" if significant is None else "はい (yes)" if significant else "いいえ (no)",
            _number(row["speedup"], "×{:.2f}"),
            _number(row["size_ratio"], "{:.2f}"),
        ]
        rows.append(cells)
        deltas.append(row["delta"])
    return QuantizationTable(headers, rows, deltas)


def render_quantization_effect(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
) -> FigureResult:
    table = "marts.quantization_effect"
    quant = _frame(frames, table)
    rows = _rows(frames, spec.tables)
    if not quant.height:
        return placeholder_figure(spec, _empty_reason(spec.tables), settings, rows)
    require_columns(quant, table, QUANTIZATION_COLUMNS, spec.key)
    content = quantization_table(quant)
    delta_column = content.headers.index("差 Δ")
    with _style():
        figure = _new_figure(1.15 * len(content.headers) + 1.0, 1.3 + 0.42 * len(content.rows))
        axes = figure.add_subplot()
        axes.set_axis_off()
        grid = axes.table(cellText=content.rows, colLabels=content.headers, loc="center", cellLoc="center")
        grid.auto_set_font_size(False)
        grid.set_fontsize(9)
        grid.scale(1.0, 1.4)
        for column in range(len(content.headers)):
            grid[0, column].set_facecolor("#e0e0e0")
        for line, delta in enumerate(content.deltas, start=1):
            if delta is not None:
                colour = "#c8e6c9" if delta > 0 else "#ffcdd2" if delta < 0 else "white"
                grid[line, delta_column].set_facecolor(colour)
        stats = {
            "rows": len(content.rows),
            "significant": int(quant["significant"].fill_null(False).sum()),
            "delta_interval": "Δ 95% 区間" in content.headers,
        }
        return _finish(spec, figure, settings, rows, stats)


RENDERERS: dict[str, Renderer] = {
    "relation_types": render_relation_types,
    "subset_quality": render_subset_quality,
    "loss_curves": render_loss_curves,
    "nll_curve": render_nll_curve,
    "model_comparison": render_model_comparison,
    "score_distribution": render_score_distribution,
    "category_heatmap": render_category_heatmap,
    "radar": render_radar,
    "question_scatter": render_question_scatter,
    "quantization_effect": render_quantization_effect,
}


def render_figure(key: str, frames: Mapping[str, pl.DataFrame | None]) -> FigureResult:
    """Render the catalogue's figure ``key`` from ``{table: frame}`` (missing tables count as empty)."""
    catalogue = load_figure_catalogue()
    if key not in catalogue.figures:
        raise KeyError(f"figure {key!r} is not in reports.yaml; known: {sorted(catalogue.figures)}")
    spec = catalogue.figures[key]
    return RENDERERS[key](spec, frames, catalogue.render)
