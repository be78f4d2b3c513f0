"""The report figures, rendered with matplotlib from polars frames of the DuckDB tables.

Every renderer takes ``{table name: frame}`` and returns a :class:`FigureResult` holding PNG bytes. An empty
or missing table gives a placeholder image that says which table is empty and what to materialize, never an
exception; a table that lacks a column the figure needs raises :class:`FigureInputError` naming both.

Rendering uses matplotlib's object API on the Agg canvas (no pyplot, no global backend switch) and the
IPAexGothic font shipped inside the ``japanize_matplotlib`` package, loaded by file path, so Japanese
labels render the same on every machine whatever fonts the system has. matplotlib is imported inside
functions: importing this module stays cheap.

This module holds what every figure shares: the catalogue's types, the result, the font and canvas, the
placeholder and the input checks. The renderers live with their stage (``qa/figures.py``,
``training/figures.py``, ``judging/figures.py``, ``export/figures.py``); ``reports/figure_catalogue.py`` maps
each key of ``reports.yaml`` to its renderer.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
def figure_style() -> Iterator[None]:
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


def new_figure(width: float, height: float) -> Figure:
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


def finish_figure(
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

    with figure_style():
        figure = new_figure(7.5, 2.6)
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


def require_columns(frame: pl.DataFrame, table: str, columns: Sequence[str], figure: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise FigureInputError(
            f"figure {figure!r}: table {table} lacks column(s) {missing} (it has {frame.columns}). "
            f"Re-materialize the asset that writes {table} with the current code, or fix its schema."
        )


def table_frame(frames: Mapping[str, pl.DataFrame | None], table: str) -> pl.DataFrame:
    frame = frames.get(table)
    return frame if frame is not None else pl.DataFrame()


def empty_reason(tables: Sequence[str]) -> str:
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


def ordered_unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def share_to_percent(values: pl.Series) -> pl.Series:
    """The marts store rates as shares (0..1, e.g. ``perfect_rate``); figures show percents."""
    return values.cast(pl.Float64) * 100.0


def palette(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if count <= 10 else colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


Renderer = Callable[[FigureSpec, Mapping[str, pl.DataFrame | None], RenderSettings], FigureResult]


def row_counts(frames: Mapping[str, pl.DataFrame | None], tables: Sequence[str]) -> dict[str, int]:
    return {table: table_frame(frames, table).height for table in tables}


@dataclass(frozen=True)
class Source:
    """What a renderer drawn from one main table gets: the table's name, its (non-empty) frame, and the row
    counts of every table the figure reads (for the figure's caption)."""

    table: str
    frame: pl.DataFrame
    rows: dict[str, int]


def drawn_from(table: str) -> Callable[[Callable[[FigureSpec, Source, RenderSettings], FigureResult]], Renderer]:
    """A renderer whose figure comes from ``table``: the wrapper reads it and returns the placeholder figure
    when it is empty, so the body only draws."""

    def wrap(body: Callable[[FigureSpec, Source, RenderSettings], FigureResult]) -> Renderer:
        @wraps(body)
        def render(
            spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], settings: RenderSettings
        ) -> FigureResult:
            frame, rows, empty = source_frame(spec, frames, table, settings)
            if empty is not None:
                return empty
            return body(spec, Source(table, frame, rows), settings)

        return render

    return wrap


def source_frame(
    spec: FigureSpec, frames: Mapping[str, pl.DataFrame | None], table: str, settings: RenderSettings
) -> tuple[pl.DataFrame, dict[str, int], FigureResult | None]:
    """A renderer's main table, the row counts of every table it reads, and the placeholder figure to return
    instead when that table is empty (None when there is something to draw)."""
    frame = table_frame(frames, table)
    rows = row_counts(frames, spec.tables)
    if frame.height:
        return frame, rows, None
    return frame, rows, placeholder_figure(spec, empty_reason(spec.tables), settings, rows)
