"""The QA data's asset checks: the pool's shape against the paper's, the subsets' nesting and stability across n (Figures 2 and 3), and the test set's composition and its overlap with training text.

No ``from __future__ import annotations`` here: Dagster reads the real annotations of check parameters."""

from datetime import datetime, timezone
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets.metadata import table_value
from jpslm_assets.outputs import png_metadata
from jpslm_assets.qa import generation as qa_generation
from jpslm_assets.qa import held_out as qa_test_set
from jpslm_assets.qa import plots as qa_plots
from jpslm_assets.qa import subsets as qa_subsets
from jpslm_assets.resources.qa_files import QADataFiles
from jpslm_assets.store import DuckDBStore


def metadata_number(value: Any) -> float:
    """A polars aggregate (None for an empty column) as a float for metadata."""
    return float(value or 0.0)


def _ensure_subset_views(store: DuckDBStore) -> None:
    with store.connect() as conn:
        for statement in qa_subsets.SUBSET_VIEWS.values():
            conn.execute(statement)


def _stored_subsets(store: DuckDBStore) -> pl.DataFrame:
    return store.read_slices("qa.training_subset", [{}])


LEAKAGE_SCHEMA: dict[str, Any] = {
    "against": pl.String,
    "ngram_chars": pl.Int64,
    "test_questions": pl.Int64,
    "training_questions": pl.Int64,
    "leaking_questions": pl.Int64,
    "leaking_ids": pl.List(pl.String),
    "longest_common_chars": pl.Int64,
    "longest_common_text": pl.String,
    "longest_test_id": pl.String,
    "longest_training_id": pl.String,
    "passed": pl.Boolean,
    "checked_at": pl.Datetime(time_zone="UTC"),
}



@dg.asset_check(
    asset="qa_pool", blocking=True, description="qa_id unique, one answer per question, every answer cites"
)
def qa_pool_is_clean(qa_pool: pl.DataFrame) -> dg.AssetCheckResult:
    questions = qa_pool.select(qa_generation.normalized("question"))["question"]
    duplicate_ids = qa_pool.height - qa_pool["qa_id"].n_unique()
    duplicate_questions = qa_pool.height - questions.n_unique()
    empty_answers = qa_pool.filter(pl.col("answer").str.len_chars() == 0).height
    uncited = sum(
        not qa_generation.cites_a_location(answer, citation)
        for answer, citation in qa_pool.select("answer", "citation").iter_rows()
    )
    return dg.AssetCheckResult(
        passed=qa_pool.height > 0 and not (duplicate_ids or duplicate_questions or empty_answers or uncited),
        metadata={
            "pairs": qa_pool.height,
            "duplicate_qa_ids": duplicate_ids,
            "duplicate_questions": duplicate_questions,
            "empty_answers": empty_answers,
            "answers_without_citation": uncited,
        },
    )


@dg.asset_check(
    asset="qa_pool",
    description="Pool size within 5% of the paper's 5,578 and every relation-type share within 1.5 points",
)
def qa_pool_matches_paper_shape(qa_pool: pl.DataFrame, qa_files: QADataFiles) -> dg.AssetCheckResult:
    paper = qa_files.catalogue().paper_reference
    shares = qa_generation.relation_shares(qa_pool, paper.counts)
    size_gap = abs(qa_pool.height / paper.pool_size - 1)
    worst = shares.sort(pl.col("delta_pp").abs(), descending=True).row(0, named=True)
    passed = size_gap <= 0.05 and abs(worst["delta_pp"]) <= 1.5
    return dg.AssetCheckResult(
        passed=passed,
        # Another graph legitimately gives another shape: warn, never block.
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "pool_size": qa_pool.height,
            "paper_pool_size": paper.pool_size,
            "size_gap_pct": round(100 * size_gap, 2),
            "largest_share_gap": f"{worst['relation_type']} {worst['delta_pp']:+.2f} pp",
        },
    )


@dg.asset_check(
    asset="training_subset",
    blocking=True,
    description="Every materialized subset has n distinct pairs and is a strict prefix of every larger one",
)
def training_subset_is_nested(training_subset: pl.DataFrame, store: DuckDBStore) -> dg.AssetCheckResult:
    """Reads every materialized partition (the input loads all n), so each run re-checks all pairs of n."""
    _ensure_subset_views(store)
    sizes = (
        training_subset.group_by("n")
        .agg(pl.len().alias("rows"), pl.col("qa_id").n_unique().alias("distinct"))
        .sort("n")
    )
    wrong_sizes = sizes.filter((pl.col("rows") != pl.col("n")) | (pl.col("distinct") != pl.col("n")))
    pairs = qa_subsets.nesting_pairs(training_subset) if training_subset.height else []
    table = pl.DataFrame(
        [
            {
                "n_small": pair.n_small,
                "n_large": pair.n_large,
                "small_rows": pair.small_rows,
                "contained": pair.contained,
                "same_positions": pair.prefix_positions,
                "nested": pair.nested,
            }
            for pair in pairs
        ],
        schema={
            "n_small": pl.Int64,
            "n_large": pl.Int64,
            "small_rows": pl.Int64,
            "contained": pl.Int64,
            "same_positions": pl.Boolean,
            "nested": pl.Boolean,
        },
    )
    return dg.AssetCheckResult(
        passed=training_subset.height > 0 and wrong_sizes.height == 0 and all(pair.nested for pair in pairs),
        metadata={
            "materialized_n": dg.MetadataValue.json(sizes["n"].to_list()),
            "subsets_with_wrong_size": dg.MetadataValue.json(wrong_sizes["n"].to_list()),
            "pairs_checked": len(pairs),
            "pairs_nested": sum(pair.nested for pair in pairs),
            "pairs": table_value(table) if pairs else "only one subset materialized",
        },
    )


def _too_few_subsets(subsets: pl.DataFrame) -> dg.AssetCheckResult | None:
    sizes = sorted(subsets["n"].unique().to_list()) if subsets.height else []
    if len(sizes) >= 2:
        return None
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description="Stability across n needs at least two materialized subsets; materialize more n partitions.",
        metadata={"materialized_n": dg.MetadataValue.json(sizes)},
    )


@dg.asset_check(
    asset="training_subset",
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="Each relation type's share is stable across n (coefficient of variation below the limit) — Figure 2",
)
def relation_shares_stable_across_n(
    training_subset: pl.DataFrame, rebalanced_pool: pl.DataFrame, qa_files: QADataFiles
) -> dg.AssetCheckResult:
    if (early := _too_few_subsets(training_subset)) is not None:
        return early
    cv_limit = qa_files.catalogue().subsets.cv_limit
    pool_shares = dict(
        qa_generation.relation_shares(rebalanced_pool).select("relation_type", "share").iter_rows()
    )
    stability = qa_subsets.share_stability(training_subset, pool_shares, cv_limit)
    shares = qa_subsets.subset_shares(training_subset)
    return dg.AssetCheckResult(
        passed=bool(stability["passed"].all()),
        metadata={
            "cv_limit": cv_limit,
            "max_cv": metadata_number(stability["cv"].max()),
            "types_over_limit": dg.MetadataValue.json(
                stability.filter(pl.col("cv") >= cv_limit)["relation_type"].to_list()
            ),
            "integer_limited_types": dg.MetadataValue.json(
                stability.filter(pl.col("integer_limited"))["relation_type"].to_list()
            ),
            "stability": table_value(
                    stability.select(
                        "relation_type",
                        "subsets",
                        "pool_share",
                        "mean_share",
                        "cv",
                        "rounding_floor_cv",
                        "min_expected_count",
                        "max_count_deviation",
                        "integer_limited",
                        "passed",
                    ),
                    percent=("pool_share", "mean_share", "cv", "rounding_floor_cv"),
                ),
            **png_metadata(
                "qa_relation_shares_by_n", qa_plots.relation_share_figure(shares, pool_shares), "Figure 2"
            ),
        },
    )


@dg.asset_check(
    asset="training_subset",
    description="Average answer length is stable across n (CV below the limit) — Figure 3",
)
def answer_length_stable_across_n(
    training_subset: pl.DataFrame, qa_files: QADataFiles
) -> dg.AssetCheckResult:
    if (early := _too_few_subsets(training_subset)) is not None:
        return early
    catalogue = qa_files.catalogue()
    summary = qa_subsets.subset_summary(training_subset, catalogue.categories)
    lengths = summary["avg_answer_chars"].to_list()
    cv = qa_subsets.coefficient_of_variation(lengths)
    low, high = catalogue.paper_reference.answer_chars
    return dg.AssetCheckResult(
        passed=cv < catalogue.subsets.cv_limit,
        metadata={
            "cv": round(cv, 5),
            "cv_limit": catalogue.subsets.cv_limit,
            "avg_answer_chars_by_n": dg.MetadataValue.json(
                {str(n): round(v, 1) for n, v in zip(summary["n"].to_list(), lengths, strict=True)}
            ),
            "within_paper_band": all(low <= v <= high for v in lengths),
            "paper_band": f"{low}-{high}",
            **png_metadata(
                "qa_answer_length_by_n",
                qa_plots.answer_length_figure(summary, catalogue.paper_reference.answer_chars),
                "Figure 3",
            ),
        },
    )


@dg.asset_check(
    asset="training_subset",
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="Every subset covers every category of the pool, with stable category shares — Figure 4",
)
def category_coverage_stable_across_n(
    training_subset: pl.DataFrame, rebalanced_pool: pl.DataFrame, qa_files: QADataFiles
) -> dg.AssetCheckResult:
    if (early := _too_few_subsets(training_subset)) is not None:
        return early
    catalogue = qa_files.catalogue()
    cv_limit = catalogue.subsets.cv_limit
    pool_categories = sorted(rebalanced_pool["category"].unique().to_list())
    summary = qa_subsets.subset_summary(training_subset, catalogue.categories)
    missing = {
        str(row["n"]): sorted(set(pool_categories) - set(row["categories"]))
        for row in summary.iter_rows(named=True)
        if set(pool_categories) - set(row["categories"])
    }
    category_pool_shares = {
        key: count / rebalanced_pool.height
        for key, count in rebalanced_pool.group_by("category").len("count").iter_rows()
    }
    category_stability = qa_subsets.share_stability(
        training_subset,
        category_pool_shares,
        cv_limit,
        "category",
        tolerance_pairs=catalogue.subsets.category_tolerance_pairs,
    )
    pool_shares = dict(
        qa_generation.relation_shares(rebalanced_pool).select("relation_type", "share").iter_rows()
    )
    relation_stability = qa_subsets.share_stability(training_subset, pool_shares, cv_limit)
    figure = qa_plots.quality_summary_figure(
        relation_stability, qa_subsets.subset_shares(training_subset, "category"), cv_limit
    )
    return dg.AssetCheckResult(
        passed=not missing and bool(category_stability["passed"].all()),
        metadata={
            "categories_in_pool": dg.MetadataValue.json(pool_categories),
            "missing_by_n": dg.MetadataValue.json(missing),
            "coverage_by_n": dg.MetadataValue.json(
                {
                    str(r["n"]): f"{r['categories_covered']}/{len(pool_categories)}"
                    for r in summary.iter_rows(named=True)
                }
            ),
            "category_stability": table_value(
                    category_stability.select(
                        "category", "pool_share", "mean_share", "cv", "integer_limited", "passed"
                    ),
                    percent=("pool_share", "mean_share", "cv"),
                ),
            **png_metadata("qa_quality_summary", figure, "Figure 4"),
        },
    )


@dg.asset_check(
    asset="test_set",
    blocking=True,
    description="The expected number of questions and of human_written ones, every category in both",
)
def test_set_composition(test_set: pl.DataFrame, qa_files: QADataFiles) -> dg.AssetCheckResult:
    catalogue = qa_files.catalogue()
    expected = catalogue.test_set
    human = test_set.filter(pl.col("human_written"))
    missing_all = sorted(set(catalogue.categories) - set(test_set["category"].to_list()))
    missing_human = sorted(set(catalogue.categories) - set(human["category"].to_list()))
    passed = (
        test_set.height == expected.questions
        and human.height == expected.human_written
        and not missing_all
        and not missing_human
    )
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "questions": f"{test_set.height} (expected {expected.questions})",
            "human_written": f"{human.height} (expected {expected.human_written})",
            "categories_missing": dg.MetadataValue.json(missing_all),
            "categories_missing_in_human_written": dg.MetadataValue.json(missing_human),
        },
    )


def _training_sets(rebalanced_pool: pl.DataFrame, store: DuckDBStore) -> list[tuple[str, pl.DataFrame]]:
    """(label, pairs) of every training set a test question must be checked against: the rebalanced pool
    (every subset of any n is drawn from it) and each materialized subset."""
    targets: list[tuple[str, pl.DataFrame]] = [("rebalanced_pool", rebalanced_pool)]
    if store.table_exists("qa.training_subset"):
        subsets = _stored_subsets(store)
        for n in sorted(subsets["n"].unique().to_list()):
            targets.append((f"training_subset n={n}", subsets.filter(pl.col("n") == n)))
    return targets


@dg.asset_check(
    asset="test_set",
    blocking=True,
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="No test question shares a character n-gram (NFKC) with any training question",
)
def test_set_has_no_lexical_overlap(
    context: dg.AssetCheckExecutionContext,
    test_set: pl.DataFrame,
    rebalanced_pool: pl.DataFrame,
    qa_files: QADataFiles,
    store: DuckDBStore,
) -> dg.AssetCheckResult:
    """Checked against the rebalanced pool — every subset of any n is drawn from it — and against each
    materialized subset, so the verdict holds for the whole n grid, present and future."""
    width = qa_files.catalogue().test_set.ngram_chars
    targets = _training_sets(rebalanced_pool, store)
    checked_at = datetime.now(timezone.utc)
    rows = []
    for against, training in targets:
        report = qa_test_set.lexical_leakage(test_set, training, width)
        rows.append(
            {
                "against": against,
                "ngram_chars": width,
                "test_questions": report.test_questions,
                "training_questions": report.training_questions,
                "leaking_questions": len(report.leaking_questions),
                "leaking_ids": report.leaking_questions,
                "longest_common_chars": report.longest_common_chars,
                "longest_common_text": report.longest_common_text,
                "longest_test_id": report.longest_test_id,
                "longest_training_id": report.longest_training_id,
                "passed": report.passed,
                "checked_at": checked_at,
            }
        )
    results = pl.DataFrame(rows, schema=LEAKAGE_SCHEMA)
    for row in results.iter_rows(named=True):
        store.write_slice(
            "qa.leakage_checks",
            results.filter(pl.col("against") == row["against"]),
            {"against": row["against"]},
        )
    worst = results.sort("longest_common_chars", descending=True).row(0, named=True)
    return dg.AssetCheckResult(
        passed=bool(results["passed"].all()),
        metadata={
            "definition": f"shared character {width}-gram after NFKC, lower-casing and whitespace removal",
            "leaking_questions": int(metadata_number(results["leaking_questions"].max())),
            "leaking_ids": dg.MetadataValue.json(
                sorted({i for ids in results["leaking_ids"].to_list() for i in ids})
            ),
            "largest_overlap_chars": worst["longest_common_chars"],
            "largest_overlap_text": worst["longest_common_text"] or "",
            "largest_overlap_between": f"{worst['longest_test_id']} / {worst['longest_training_id']}",
            "checked_against": table_value(
                    results.select(
                        "against", "training_questions", "leaking_questions", "longest_common_chars", "passed"
                    )
                ),
        },
    )


@dg.asset_check(
    asset="test_set",
    blocking=False,
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="Reports reference answers that repeat a clause of a training answer verbatim (citations masked)",
)
def reference_answers_overlap_training(
    test_set: pl.DataFrame, rebalanced_pool: pl.DataFrame, qa_files: QADataFiles, store: DuckDBStore
) -> dg.AssetCheckResult:
    """A report, not a filter: every question stays in the evaluation and ``qa.reference_overlap`` holds, per
    question and per training set (the pool and each materialized subset), the longest verbatim run, so a
    score can be read with and without the overlapping references. It warns when a human-written
    (evaluated) reference reaches the limit; the rule is in ``qa/held_out.py`` and docs/judging.md."""
    limit = qa_files.catalogue().test_set.reference_run_chars
    targets = _training_sets(rebalanced_pool, store)
    checked_at = datetime.now(timezone.utc)
    reports = []
    for against, training in targets:
        report = qa_test_set.reference_overlap(test_set, training, limit).with_columns(
            pl.lit(against).alias("against"), pl.lit(checked_at).alias("checked_at")
        )
        store.write_slice("qa.reference_overlap", report, {"against": against})
        reports.append(report)
    evaluated = reports[0].filter(pl.col("human_written"))  # the pool: every subset is drawn from it
    flagged = evaluated.filter(pl.col("repeats_training")).sort("longest_run_chars", descending=True)
    worst = evaluated.sort("longest_run_chars", descending=True).head(1)
    return dg.AssetCheckResult(
        passed=flagged.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rule": f"citations masked, a run of {limit}+ characters shared with a training answer (NFKC)",
            "evaluated_references": evaluated.height,
            "overlapping_references": flagged.height,
            "overlapping_ids": dg.MetadataValue.json(flagged["question_id"].to_list()),
            "longest_run_chars": int(metadata_number(worst["longest_run_chars"].max())),
            "longest_run_text": worst["longest_run_text"][0] if worst.height else "",
            "longest_run_chars_unmasked": int(metadata_number(evaluated["longest_run_chars_unmasked"].max())),
            "mean_shared_8gram_share": metadata_number(evaluated["shared_8gram_share"].mean()),
            "results_table": "qa.reference_overlap",
        },
    )
