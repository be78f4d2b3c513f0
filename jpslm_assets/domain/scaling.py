"""Stage 1's decision: which training-set size n gives the lowest test NLL, and how each n compares.

Status of each n against the optimum n* (the paper's Table 2 vocabulary):
- ``optimal``: n = n*, the lowest test NLL (ties go to the smaller n: same quality for less training);
- ``overfitting``: n > n*, more data than the optimum and a higher NLL;
- ``underfit``: the smallest n of the grid when it is below n*;
- ``improving``: the sizes between that smallest n and n*.
Two differences per n, as the paper's Table 2 and a reader of it need them:
- ``delta_nll``: the change from the previous (smaller) n of the grid, NULL at the smallest n; the paper's
  ΔNLL (5k: +0.192 over 4k reads "overfitting");
- ``nll_above_optimum``: the distance to the optimum, 0 at n*.
"""

from __future__ import annotations

import math

import polars as pl

SCALE_CURVE_COLUMNS = (
    "model",
    "n",
    "stage",
    "train_loss_final",
    "test_nll",
    "test_ppl",
    "delta_nll",
    "nll_above_optimum",
    "status",
    "is_optimal",
)


class ScaleCurveError(ValueError):
    """The inputs cannot form a scale curve; the message names the model, the n and the fix."""


def scale_curve(points: pl.DataFrame) -> pl.DataFrame:
    """One row per n for one model, with perplexity, delta to the optimum, status and the optimum flag.

    ``points`` needs ``model``, ``n``, ``train_loss_final`` and ``test_nll`` (``stage`` optional).
    """
    required = {"model", "n", "train_loss_final", "test_nll"}
    missing = required - set(points.columns)
    if missing:
        raise ScaleCurveError(f"scale curve input lacks column(s) {sorted(missing)}")
    if points.is_empty():
        raise ScaleCurveError("no (n, test NLL) points: materialize stage1_lora_adapter and stage1_test_nll first")
    models = points["model"].unique().to_list()
    if len(models) != 1:
        raise ScaleCurveError(f"a scale curve covers one model, got {sorted(models)}")
    model = models[0]
    duplicated = points.group_by("n").len().filter(pl.col("len") > 1)["n"].to_list()
    if duplicated:
        raise ScaleCurveError(f"model {model}: more than one row for n={sorted(duplicated)}")
    for n, nll in points.select("n", "test_nll").iter_rows():
        if nll is None or not math.isfinite(nll):
            raise ScaleCurveError(
                f"model {model}, n={n}: test NLL is {nll}; re-materialize stage1_test_nll[{n}] "
                "(a diverged adapter gives NaN: lower the learning rate)."
            )
    if "stage" not in points.columns:
        points = points.with_columns(pl.lit(None, dtype=pl.Int64).alias("stage"))

    ordered = points.sort("n")
    best_nll = ordered["test_nll"].min()
    best_n = ordered.filter(pl.col("test_nll") == best_nll)["n"].min()
    smallest_n = ordered["n"].min()
    status = (
        pl.when(pl.col("n") == best_n)
        .then(pl.lit("optimal"))
        .when(pl.col("n") > best_n)
        .then(pl.lit("overfitting"))
        .when(pl.col("n") == smallest_n)
        .then(pl.lit("underfit"))
        .otherwise(pl.lit("improving"))
    )
    return ordered.select(
        pl.col("model").cast(pl.Utf8),
        pl.col("n").cast(pl.Int64),
        pl.col("stage").cast(pl.Int64),
        pl.col("train_loss_final").cast(pl.Float64),
        pl.col("test_nll").cast(pl.Float64),
        pl.col("test_nll").exp().alias("test_ppl"),
        pl.col("test_nll").diff().alias("delta_nll"),
        (pl.col("test_nll") - best_nll).alias("nll_above_optimum"),
        status.alias("status"),
        (pl.col("n") == best_n).alias("is_optimal"),
    )


def optimal_n(curve: pl.DataFrame) -> int:
    """The n flagged optimal in a curve built by :func:`scale_curve`."""
    chosen = curve.filter(pl.col("is_optimal"))["n"].to_list()
    if len(chosen) != 1:
        raise ScaleCurveError(f"expected exactly one optimal n, found {chosen}")
    return int(chosen[0])


def check_n_in_grid(n: int, grid: list[int], what: str = "n") -> int:
    """``n`` itself, or a clear error when it is not one of the profile's training-set sizes."""
    if n not in grid:
        raise ScaleCurveError(
            f"{what}={n} is not in the profile's n_grid {grid}; use one of those sizes, or add {n} to n_grid "
            "(profile YAML or JPSLM_N_GRID) and materialize training_subset for it."
        )
    return n
