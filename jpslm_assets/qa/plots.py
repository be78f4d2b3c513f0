"""Subset quality figures (the paper's Figures 2-4), rendered to PNG bytes with matplotlib.

Japanese labels need a font with kana and kanji: the IPAex Gothic file shipped inside the
``japanize-matplotlib`` package is loaded by path, so nothing depends on fonts installed on the machine.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state), which is safe in a worker.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from jpslm_assets.common.figures import japanese_font_path


def _font() -> Any:
    from matplotlib import font_manager

    path = japanese_font_path()
    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path))


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    font = _font()
    figure = Figure(figsize=(width, height))
    return figure, font


def relation_share_figure(shares: pl.DataFrame, pool_shares: Mapping[str, float]) -> bytes:
    """Figure 2: share of each relation type in each subset, beside its share in the rebalanced pool."""
    figure, font = _figure(9, 4.5)
    axes = figure.add_subplot()
    types = sorted(pool_shares, key=lambda key: -pool_shares[key])
    sizes = sorted(shares["n"].unique().to_list())
    width = 0.8 / (len(sizes) + 1)
    for offset, n in enumerate(sizes):
        of_n = dict(shares.filter(pl.col("n") == n).select("relation_type", "share").iter_rows())
        axes.bar(
            [i + offset * width for i in range(len(types))],
            [100 * of_n.get(t, 0.0) for t in types],
            width=width,
            label=f"n={n}",
        )
    axes.bar(
        [i + len(sizes) * width for i in range(len(types))],
        [100 * pool_shares[t] for t in types],
        width=width,
        color="black",
        alpha=0.35,
        label="プール全体",
    )
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(types))])
    axes.set_xticklabels(types, rotation=35, ha="right", fontsize=8)
    axes.set_ylabel("割合 (%)", fontproperties=font)
    axes.set_title("関係タイプ別の割合（訓練サブセット別）", fontproperties=font)
    axes.legend(prop=font, fontsize=8)
    return _png(figure)


def answer_length_figure(summary: pl.DataFrame, paper_band: Sequence[int]) -> bytes:
    """Figure 3: average answer length per subset, with the paper's reported band shaded."""
    figure, font = _figure(6.5, 4)
    axes = figure.add_subplot()
    sizes = summary["n"].to_list()
    lengths = summary["avg_answer_chars"].to_list()
    axes.plot(sizes, lengths, marker="o", label="平均回答長")
    low, high = paper_band
    axes.axhspan(low, high, color="tab:green", alpha=0.15, label=f"論文の報告値 {low}-{high} 字")
    spread = max(lengths) - min(lengths) if lengths else 0.0
    floor = min([*lengths, low]) - max(20.0, spread)
    ceiling = max([*lengths, high]) + max(20.0, spread)
    axes.set_ylim(floor, ceiling)
    axes.set_xticks(sizes)
    axes.set_xlabel("サブセットのサイズ n", fontproperties=font)
    axes.set_ylabel("平均回答長（文字）", fontproperties=font)
    axes.set_title("回答長の安定性", fontproperties=font)
    axes.legend(prop=font, fontsize=8)
    return _png(figure)


def quality_summary_figure(stability: pl.DataFrame, category_shares: pl.DataFrame, cv_limit: float) -> bytes:
    """Figure 4: CV of every relation type's share across subsets, and category shares per subset."""
    figure, font = _figure(11, 4.5)
    left, right = figure.subplots(1, 2)
    types = stability["relation_type"].to_list()
    cvs = [100 * value for value in stability["cv"].to_list()]
    colors = ["tab:blue" if ok else "tab:red" for ok in stability["passed"].to_list()]
    bars = left.barh(types, cvs, color=colors)
    # Types whose counts are too small for the limit are judged by the integer bound: hatch them.
    for bar, limited in zip(bars, stability["integer_limited"].to_list(), strict=True):
        if limited:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    limit_line = left.axvline(
        100 * cv_limit, color="black", linestyle="--", label=f"上限 {100 * cv_limit:.0f}%"
    )
    handles = [limit_line]
    if any(stability["integer_limited"].to_list()):
        from matplotlib.patches import Patch

        handles.append(
            Patch(facecolor="tab:blue", hatch="//", edgecolor="white", label="件数が少なく整数の制約で判定")
        )
    left.invert_yaxis()
    left.tick_params(axis="y", labelsize=8)
    left.set_xlabel("変動係数 CV (%)", fontproperties=font)
    left.set_title("関係タイプ割合の変動係数", fontproperties=font)
    left.legend(handles=handles, prop=font, fontsize=8)

    sizes = sorted(category_shares["n"].unique().to_list())
    categories = sorted(category_shares["category"].unique().to_list())
    bottom = [0.0] * len(sizes)
    for category in categories:
        values = []
        for n in sizes:
            row = category_shares.filter((pl.col("n") == n) & (pl.col("category") == category))
            values.append(100 * (row["share"][0] if row.height else 0.0))
        right.bar([str(n) for n in sizes], values, bottom=bottom, label=category)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xlabel("サブセットのサイズ n", fontproperties=font)
    right.set_ylabel("割合 (%)", fontproperties=font)
    right.set_title("カテゴリの構成", fontproperties=font)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(figure)
