"""Stage 1's decision: which training-set size n gives the lowest test NLL, and how each n compares.

n* is the n with the lowest mean test NLL (ties go to the smaller n: same quality for less training). Whether
another n is really worse is a question about the evaluation questions, not about the means: with per-question
NLLs, the difference ``NLL(n) - NLL(n*)`` gets a paired bootstrap interval over the questions (each resample
draws questions and scores both n on them), and the status of each n says what that interval supports:
- ``optimal``: n = n*;
- ``indistinguishable from optimal``: the interval of the difference includes zero, so these questions cannot
  tell n from n* (the paper's 4k vs 3k gap of 0.088 would need a tight interval; a gap of 0.018 on eight
  demo questions has none);
- ``underfit``: n < n* and the interval excludes zero (n is worse than n*, with less data);
- ``overfitting``: n > n* and the interval excludes zero.
Without per-question NLLs (means only, as in the paper's table) there is no interval and the status falls
back to the position: ``underfit`` below n*, ``overfitting`` above. ``paper_status`` keeps the paper's own
Table 2 vocabulary (the smallest n ``underfit``, the sizes up to n* ``improving``) for comparison.
Two differences per n, as the paper's Table 2 and a reader of it need them:
- ``delta_nll``: the change from the previous (smaller) n of the grid, NULL at the smallest n; the paper's
  ΔNLL (5k: +0.192 over 4k reads "overfitting");
- ``nll_above_optimum``: the distance to the optimum, 0 at n*, with ``diff_ci_low`` / ``diff_ci_high``
  its 95% interval over ``paired_questions`` questions.
"""

from __future__ import annotations

import math

import polars as pl

from jpslm_assets.common.statistics import paired_ratio_difference_ci

SCALE_CURVE_COLUMNS = (
    "model",
    "n",
    "stage",
    "train_loss_final",
    "test_nll",
    "test_ppl",
    "delta_nll",
    "nll_above_optimum",
    "diff_ci_low",
    "diff_ci_high",
    "paired_questions",
    "status",
    "paper_status",
    "is_optimal",
)

# Per-question input: one row per (n, question) with the question's answer-token loss sum and token count.
QUESTION_NLL_COLUMNS = ("n", "question_id", "nll", "answer_tokens")
INDISTINGUISHABLE = "indistinguishable from optimal"
STATUSES = ("optimal", INDISTINGUISHABLE, "underfit", "overfitting")


class ScaleCurveError(ValueError):
    """The inputs cannot form a scale curve; the message names the model, the n and the fix."""


def scale_curve(
    points: pl.DataFrame, questions: pl.DataFrame | None = None, resamples: int = 9999, seed: int = 0
) -> pl.DataFrame:
    """One row per n for one model, with perplexity, delta to the optimum, its interval, status and the flag.

    ``points`` needs ``model``, ``n``, ``train_loss_final`` and ``test_nll`` (``stage`` optional).
    ``questions`` (optional) holds the per-question NLLs, columns :data:`QUESTION_NLL_COLUMNS`; an n is
    compared with n* on the questions both were scored on.
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
    best_n = int(ordered.filter(pl.col("test_nll") == best_nll)["n"].min())  # type: ignore[arg-type]
    smallest_n = ordered["n"].min()
    intervals = _intervals(model, ordered["n"].to_list(), best_n, questions, resamples, seed)
    paper_status = (
        pl.when(pl.col("n") == best_n)
        .then(pl.lit("optimal"))
        .when(pl.col("n") > best_n)
        .then(pl.lit("overfitting"))
        .when(pl.col("n") == smallest_n)
        .then(pl.lit("underfit"))
        .otherwise(pl.lit("improving"))
    )
    excludes_zero = (pl.col("diff_ci_low") > 0) | (pl.col("diff_ci_high") < 0)
    status = (
        pl.when(pl.col("n") == best_n)
        .then(pl.lit("optimal"))
        .when(pl.col("diff_ci_low").is_not_null() & ~excludes_zero)
        .then(pl.lit(INDISTINGUISHABLE))
        .when(pl.col("n") < best_n)
        .then(pl.lit("underfit"))
        .otherwise(pl.lit("overfitting"))
    )
    return (
        ordered.join(intervals, on="n", how="left")
        .sort("n")
        .select(
            pl.col("model").cast(pl.Utf8),
            pl.col("n").cast(pl.Int64),
            pl.col("stage").cast(pl.Int64),
            pl.col("train_loss_final").cast(pl.Float64),
            pl.col("test_nll").cast(pl.Float64),
            pl.col("test_nll").exp().alias("test_ppl"),
            pl.col("test_nll").diff().alias("delta_nll"),
            (pl.col("test_nll") - best_nll).alias("nll_above_optimum"),
            pl.col("diff_ci_low"),
            pl.col("diff_ci_high"),
            pl.col("paired_questions"),
            status.alias("status"),
            paper_status.alias("paper_status"),
            (pl.col("n") == best_n).alias("is_optimal"),
        )
    )


def _intervals(
    model: str, grid: list[int], best_n: int, questions: pl.DataFrame | None, resamples: int, seed: int
) -> pl.DataFrame:
    """Per n: the paired bootstrap interval of NLL(n) - NLL(n*) and the number of questions it pairs."""
    schema = {
        "n": pl.Int64,
        "diff_ci_low": pl.Float64,
        "diff_ci_high": pl.Float64,
        "paired_questions": pl.Int64,
    }
    if questions is None or questions.is_empty():
        return pl.DataFrame({"n": grid}, schema={"n": pl.Int64}).with_columns(
            *(pl.lit(None, dtype=dtype).alias(name) for name, dtype in schema.items() if name != "n")
        )
    missing = set(QUESTION_NLL_COLUMNS) - set(questions.columns)
    if missing:
        raise ScaleCurveError(f"model {model}: per-question NLL input lacks column(s) {sorted(missing)}")
    bad = questions.filter(
        pl.col("nll").is_null() | ~pl.col("nll").is_finite() | (pl.col("answer_tokens").fill_null(0) <= 0)
    )
    if bad.height:
        n, question_id = bad["n"][0], bad["question_id"][0]
        raise ScaleCurveError(
            f"model {model}, n={n}, question {question_id}: per-question NLL is {bad['nll'][0]} over "
            f"{bad['answer_tokens'][0]} answer tokens; re-materialize stage1_test_nll[{n}]."
        )
    frame = questions.select(
        pl.col("n").cast(pl.Int64),
        pl.col("question_id").cast(pl.Utf8),
        (pl.col("nll") * pl.col("answer_tokens")).cast(pl.Float64).alias("loss_sum"),
        pl.col("answer_tokens").cast(pl.Float64),
    )
    reference = frame.filter(pl.col("n") == best_n)
    rows: list[tuple[int, float | None, float | None, int | None]] = []
    for n in grid:
        if n == best_n:
            rows.append((n, 0.0, 0.0, reference.height or None))
            continue
        paired = frame.filter(pl.col("n") == n).join(reference, on="question_id", suffix="_best")
        if paired.height < 2:
            rows.append((n, None, None, paired.height or None))
            continue
        _, interval = paired_ratio_difference_ci(
            paired["loss_sum"].to_numpy(),
            paired["answer_tokens"].to_numpy(),
            paired["loss_sum_best"].to_numpy(),
            paired["answer_tokens_best"].to_numpy(),
            resamples=resamples,
            seed=seed,
        )
        low = None if math.isnan(interval.low) else interval.low
        high = None if math.isnan(interval.high) else interval.high
        rows.append((n, low, high, paired.height))
    return pl.DataFrame(rows, schema=schema, orient="row")


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
