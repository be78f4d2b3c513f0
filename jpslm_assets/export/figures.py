"""The export stage's figure: what quantization does to the scores, and the table the report prints of it
(see ``figures`` for what every renderer shares)."""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    require_columns,
    series_columns,
)

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


@drawn_from("marts.quantization_effect")
def render_quantization_effect(spec: FigureSpec, source: Source, settings: RenderSettings) -> FigureResult:
    quant, table, rows = source.frame, source.table, source.rows
    require_columns(quant, table, QUANTIZATION_COLUMNS, spec.key)
    content = quantization_table(quant)
    delta_column = content.headers.index("差 Δ")
    with figure_style():
        figure = new_figure(1.15 * len(content.headers) + 1.0, 1.3 + 0.42 * len(content.rows))
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
        return finish_figure(spec, figure, settings, rows, stats)
