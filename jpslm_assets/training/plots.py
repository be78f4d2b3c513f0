"""Plots of stage 1: training-loss curves per n (paper Figure 5) and the test-NLL U-curve (Figure 6).

Figures are drawn on matplotlib's object API with the Agg canvas (no pyplot global state, safe in worker
processes) and returned as PNG bytes. Japanese labels use the IPAex Gothic font bundled with
``japanize_matplotlib``, loaded by file path so no global rc settings change.
"""

from __future__ import annotations

import io
from typing import Any

import polars as pl

from jpslm_assets.common.figures import japanese_font_path


def _figure(width: float = 7.0, height: float = 4.2) -> tuple[Any, Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1), FontProperties(fname=str(japanese_font_path()))


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_loss_curves(loss_curve: pl.DataFrame, title: str) -> bytes:
    """Training loss against optimizer step, one line per n (``model``, ``n``, ``step``, ``loss``)."""
    figure, axes, font = _figure()
    for (n,), rows in loss_curve.sort("n", "step").group_by("n", maintain_order=True):
        axes.plot(rows["step"].to_list(), rows["loss"].to_list(), label=f"n={n}", linewidth=1.4)
    axes.set_xlabel("ステップ (optimizer step)", fontproperties=font)
    axes.set_ylabel("学習損失 (train loss)", fontproperties=font)
    axes.set_title(title, fontproperties=font)
    axes.grid(alpha=0.3)
    if loss_curve.height:
        axes.legend(prop=font)
    return _png(figure)


def plot_scale_curve(curve: pl.DataFrame, title: str) -> bytes:
    """Test NLL against n with the optimum marked, each n's interval against it, and train loss (the U-curve)."""
    figure, axes, font = _figure()
    ordered = curve.sort("n")
    ns = ordered["n"].to_list()
    axes.plot(ns, ordered["test_nll"].to_list(), marker="o", label="テストNLL (test NLL)", color="#1f77b4")
    if ordered["train_loss_final"].null_count() < ordered.height:
        axes.plot(
            ns,
            ordered["train_loss_final"].to_list(),
            marker="s",
            linestyle="--",
            label="最終学習損失 (final train loss)",
            color="#7f7f7f",
        )
    best = ordered.filter(pl.col("is_optimal"))
    if best.height and "diff_ci_low" in ordered.columns:
        # Each n's NLL as n*'s NLL plus the paired interval of its difference: a bar that reaches the dashed
        # line at n*'s NLL means these questions cannot tell that n from n*.
        optimum = float(best["test_nll"][0])
        known = ordered.filter(pl.col("diff_ci_low").is_not_null() & ~pl.col("is_optimal"))
        if known.height:
            nlls = known["test_nll"].to_numpy()
            low = optimum + known["diff_ci_low"].to_numpy()
            high = optimum + known["diff_ci_high"].to_numpy()
            axes.errorbar(
                known["n"].to_list(),
                nlls,
                yerr=[(nlls - low).clip(min=0), (high - nlls).clip(min=0)],
                fmt="none",
                ecolor="#1f77b4",
                capsize=4,
                label="n* との差の95%区間 (paired bootstrap)",
            )
            axes.axhline(optimum, color="#d62728", linestyle=":", linewidth=1)
    if best.height:
        axes.scatter(
            best["n"].to_list(),
            best["test_nll"].to_list(),
            s=160,
            facecolors="none",
            edgecolors="#d62728",
            linewidths=2,
            zorder=5,
            label=f"最適 n={best['n'][0]}",
        )
    for n, nll, status in ordered.select("n", "test_nll", "status").iter_rows():
        axes.annotate(status, (n, nll), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    axes.set_xlabel("学習データ数 n", fontproperties=font)
    axes.set_ylabel("回答トークンあたりNLL", fontproperties=font)
    axes.set_title(title, fontproperties=font)
    axes.grid(alpha=0.3)
    axes.legend(prop=font)
    return _png(figure)
