"""Rebalancing the pool and drawing nested, stratified training subsets, with their quality measures.

Nesting comes from one seeded ordering of the whole rebalanced pool: the subset of size n is the first n
pairs of that ordering, so every subset is a prefix of every larger one, whatever the n grid. The ordering
interleaves relation types by Webster's divisor method and steers categories within each type, so every
prefix holds each relation type within one pair of its proportional share (see ``nested_order``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl


class SubsetError(ValueError):
    """A subset request cannot be met (n larger than the pool, bad keep fraction); the message says why."""


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest-remainder method)."""
    weight_sum = float(sum(weights))
    if total < 0 or weight_sum <= 0:
        raise SubsetError(f"cannot apportion {total} over weights summing to {weight_sum}")
    quotas = [total * w / weight_sum for w in weights]
    counts = [math.floor(q) for q in quotas]
    remainders = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for index in remainders[: total - sum(counts)]:
        counts[index] += 1
    return counts


@dataclass(frozen=True)
class RebalanceResult:
    frame: pl.DataFrame
    kept_by_type: dict[str, int]
    removed_by_type: dict[str, int]


def rebalance(pool: pl.DataFrame, keep_fraction: Mapping[str, float], seed: int) -> RebalanceResult:
    """Keep ``keep_fraction[t]`` of each listed relation type (seeded), every other pair untouched.

    The kept number is round(fraction x count); it is spread over the type's relations in proportion to
    their pairs, so every relation (e.g. every chapter) keeps questions and only the repetition shrinks.
    """
    present = set(pool["relation_type"].unique().to_list())
    for relation_type, fraction in keep_fraction.items():
        if relation_type not in present:
            raise SubsetError(
                f"rebalance.keep_fraction names {relation_type}, which has no pairs in the pool "
                f"(types present: {', '.join(sorted(present))}); remove it from qa_templates.yaml."
            )
        if not 0.0 < fraction <= 1.0:
            raise SubsetError(f"keep fraction for {relation_type} is {fraction}; use a value in (0, 1].")
    rng = np.random.default_rng(seed)
    ordered = pool.sort("qa_id")
    dropped: list[str] = []
    kept_by_type: dict[str, int] = {}
    removed_by_type: dict[str, int] = {}
    for relation_type in sorted(keep_fraction):
        of_type = ordered.filter(pl.col("relation_type") == relation_type)
        target = round_half_up(keep_fraction[relation_type] * of_type.height)
        groups = of_type.group_by("relation_id", maintain_order=True).agg(pl.col("qa_id")).sort("relation_id")
        sizes = [len(ids) for ids in groups["qa_id"].to_list()]
        quotas = apportion(target, sizes)
        for ids, quota in zip(groups["qa_id"].to_list(), quotas, strict=True):
            chosen = set(rng.choice(len(ids), size=quota, replace=False).tolist())
            dropped.extend(qa_id for index, qa_id in enumerate(ids) if index not in chosen)
        kept_by_type[relation_type] = target
        removed_by_type[relation_type] = of_type.height - target
    frame = ordered.filter(~pl.col("qa_id").is_in(dropped))
    return RebalanceResult(frame=frame, kept_by_type=kept_by_type, removed_by_type=removed_by_type)


def nested_order(pool: pl.DataFrame, seed: int, within_type_weight: float = 0.5) -> pl.DataFrame:
    """The pool in subset order, with ``position`` 1..N: the first n rows form the subset of size n.

    Two strata. Relation types follow Webster's divisor schedule: the j-th of N_t pairs of type t gets the
    key (j + 0.5) / N_t and positions go to types in key order, so every prefix holds each type within one
    pair of its proportional count. Within the type chosen for a position, the pair's category is the one
    furthest behind its share, counting both its share of the whole pool and (weighted by
    ``within_type_weight``) its share within the type; categories depend on types, so they can only be
    steered, and every prefix stays within about two pairs. Pairs inside a (type, category) stratum come
    in a seeded random order; the result depends only on the pool's content and the seed.
    """
    if pool.height == 0:
        raise SubsetError("the rebalanced pool is empty: there is nothing to draw subsets from.")
    rng = np.random.default_rng(seed)
    shuffled = (
        pool.sort("qa_id").with_columns(pl.Series("_shuffle", rng.permutation(pool.height))).sort("_shuffle")
    )
    types = shuffled["relation_type"].to_list()
    categories = shuffled["category"].to_list()
    total = len(types)

    type_sizes = Counter(types)
    type_names = sorted(type_sizes, key=lambda name: (-type_sizes[name], name))
    keys = np.concatenate([(np.arange(type_sizes[name]) + 0.5) / type_sizes[name] for name in type_names])
    type_index = np.concatenate([np.full(type_sizes[name], i) for i, name in enumerate(type_names)])
    # Ties (equal keys) go to the larger type first, then by name: deterministic.
    schedule = type_index[np.lexsort((type_index, keys))]

    category_share = {name: count / total for name, count in Counter(categories).items()}
    queues: dict[str, dict[str, list[int]]] = {}
    for row, (relation_type, category) in enumerate(zip(types, categories, strict=True)):
        queues.setdefault(relation_type, {}).setdefault(category, []).append(row)
    share_in_type = {
        t: {c: len(rows) / type_sizes[t] for c, rows in by_category.items()}
        for t, by_category in queues.items()
    }
    taken_category = dict.fromkeys(category_share, 0)
    taken_in_type = {t: dict.fromkeys(by_category, 0) for t, by_category in queues.items()}
    taken_type = dict.fromkeys(type_sizes, 0)
    order: list[int] = []
    for position, index in enumerate(schedule.tolist(), start=1):
        relation_type = type_names[index]
        best, best_deficit = "", -math.inf
        for category, rows in queues[relation_type].items():
            used = taken_in_type[relation_type][category]
            if used >= len(rows):
                continue
            deficit = position * category_share[category] - taken_category[category]
            deficit += within_type_weight * (
                (taken_type[relation_type] + 1) * share_in_type[relation_type][category] - used
            )
            if deficit > best_deficit:
                best, best_deficit = category, deficit
        order.append(queues[relation_type][best][taken_in_type[relation_type][best]])
        taken_in_type[relation_type][best] += 1
        taken_category[best] += 1
        taken_type[relation_type] += 1
    return (
        shuffled[order]
        .drop("_shuffle")
        .with_row_index("position", offset=1)
        .with_columns(pl.col("position").cast(pl.Int64))
    )


def take_subset(ordered: pl.DataFrame, n: int) -> pl.DataFrame:
    """The first ``n`` pairs of the nested ordering, with an ``n`` column; clear error when n is too large."""
    if n <= 0:
        raise SubsetError(f"n={n} must be positive.")
    if n > ordered.height:
        raise SubsetError(
            f"n={n} is larger than the rebalanced pool ({ordered.height} pairs). Lower the profile's n_grid "
            f"(JPSLM_N_GRID) to at most {ordered.height}, or enlarge the pool (more relations in the graph or "
            "more templates in qa_templates.yaml)."
        )
    return ordered.head(n).with_columns(pl.lit(n, dtype=pl.Int64).alias("n"))


def subset_shares(subsets: pl.DataFrame, column: str = "relation_type") -> pl.DataFrame:
    """Count and share of each value of ``column`` in each subset (rows: n, value, count, share)."""
    sizes = subsets.group_by("n").len("size")
    counts = subsets.group_by(["n", column]).len("count")
    # Every (n, value) combination, so an absent type shows as a 0 share rather than vanishing.
    grid = subsets.select("n").unique().join(subsets.select(column).unique(), how="cross")
    return (
        grid.join(counts, on=["n", column], how="left")
        .join(sizes, on="n")
        .with_columns(pl.col("count").fill_null(0).cast(pl.Int64))
        .with_columns((pl.col("count") / pl.col("size")).alias("share"))
        .drop("size")
        .sort(["n", column])
    )


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population CV (std / mean, ddof=0, as scipy.stats.variation); 0 for a constant series."""
    from scipy.stats import variation

    array = np.asarray(values, dtype=float)
    if array.size == 0 or np.allclose(array, 0.0):
        return 0.0
    return float(variation(array))


def share_stability(
    subsets: pl.DataFrame,
    pool_shares: Mapping[str, float],
    cv_limit: float,
    column: str = "relation_type",
    tolerance_pairs: float = 1.0,
) -> pl.DataFrame:
    """Per value of ``column``: CV of its share across subsets and whether it passes.

    A value passes when its CV is below ``cv_limit``, or — when so few pairs of it fit in the smallest
    subset that a single pair more or less exceeds the limit (``integer_limited``) — when every subset
    holds it within ``tolerance_pairs`` pairs of its proportional count. ``rounding_floor_cv`` is the CV that perfectly
    rounded counts would have, for comparison.
    """
    shares = subset_shares(subsets, column)
    rows: list[dict[str, Any]] = []
    for value, group in shares.group_by(column, maintain_order=True):
        key = value[0]
        group = group.sort("n")
        ns = group["n"].to_list()
        counts = group["count"].to_list()
        share_values = group["share"].to_list()
        pool_share = float(pool_shares.get(key, 0.0))
        expected = [n * pool_share for n in ns]
        cv = coefficient_of_variation(share_values)
        best = [round_half_up(e) / n for e, n in zip(expected, ns, strict=True)]
        rounding_floor = coefficient_of_variation(best)
        within_tolerance = all(
            abs(c - e) < tolerance_pairs + 1e-9 for c, e in zip(counts, expected, strict=True)
        )
        # One pair more or less than proportional is already more than cv_limit of the smallest expected
        # count: integer counts cannot promise the limit, so proportional-within-one-pair is the test.
        integer_limited = min(expected) * cv_limit < 1.0
        rows.append(
            {
                column: key,
                "subsets": len(ns),
                "pool_share": pool_share,
                "mean_share": float(np.mean(share_values)),
                "cv": cv,
                "rounding_floor_cv": rounding_floor,
                "min_expected_count": min(expected),
                "max_count_deviation": max(abs(c - e) for c, e in zip(counts, expected, strict=True)),
                "integer_limited": integer_limited,
                "passed": cv < cv_limit or (integer_limited and within_tolerance),
            }
        )
    return pl.DataFrame(rows).sort("pool_share", descending=True)


@dataclass(frozen=True)
class NestingResult:
    n_small: int
    n_large: int
    small_rows: int
    contained: int
    prefix_positions: bool

    @property
    def nested(self) -> bool:
        return self.contained == self.small_rows and self.n_small < self.n_large and self.prefix_positions


def nesting_pairs(subsets: pl.DataFrame) -> list[NestingResult]:
    """For every pair of subset sizes (small < large): is the small subset inside the large one?

    ``prefix_positions`` also requires that each shared pair sits at the same position in both, i.e. the
    small subset is exactly the first rows of the large one.
    """
    sizes = sorted(subsets["n"].unique().to_list())
    by_n = {n: subsets.filter(pl.col("n") == n).select("qa_id", "position") for n in sizes}
    results: list[NestingResult] = []
    for i, small in enumerate(sizes):
        for large in sizes[i + 1 :]:
            joined = by_n[small].join(by_n[large], on="qa_id", how="left", suffix="_large")
            contained = joined.filter(pl.col("position_large").is_not_null())
            same_place = contained.filter(pl.col("position") == pl.col("position_large")).height
            results.append(
                NestingResult(
                    n_small=small,
                    n_large=large,
                    small_rows=by_n[small].height,
                    contained=contained.height,
                    prefix_positions=same_place == contained.height,
                )
            )
    return results


def subset_summary(subsets: pl.DataFrame, categories: Sequence[str]) -> pl.DataFrame:
    """Per subset: rows, average answer/question length, categories covered and their number."""
    known = list(categories)
    return (
        subsets.group_by("n")
        .agg(
            pl.len().alias("rows"),
            pl.col("answer_chars").mean().alias("avg_answer_chars"),
            pl.col("question_chars").mean().alias("avg_question_chars"),
            pl.col("category").unique().sort().alias("categories"),
            pl.col("relation_type").n_unique().alias("relation_types"),
        )
        .with_columns(
            pl.col("categories").list.len().alias("categories_covered"),
            pl.lit(len(known)).alias("categories_known"),
        )
        .sort("n")
    )


def chat_lines(subset: pl.DataFrame, system_prompt: str = "") -> list[str]:
    """One JSON line per pair in position order: ``{"id", "relation_type", "messages": [...]}``.

    The layout is the common "messages" chat format, so TRL, axolotl or unsloth read the file as is.
    """
    import json

    lines = []
    for row in (
        subset.sort("position").select("qa_id", "relation_type", "question", "answer").iter_rows(named=True)
    ):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
        record = {"id": row["qa_id"], "relation_type": row["relation_type"], "messages": messages}
        lines.append(json.dumps(record, ensure_ascii=False))
    return lines


# SQL views over qa.training_subset, so the same quality measures are queryable from DuckDB. Shares use
# population statistics (stddev_pop), matching coefficient_of_variation above.
SUBSET_VIEWS: dict[str, str] = {
    "qa.subset_relation_shares": """
        CREATE OR REPLACE VIEW qa.subset_relation_shares AS
        SELECT n, relation_type, count(*) AS count,
               count(*) / sum(count(*)) OVER (PARTITION BY n) AS share
        FROM qa.training_subset GROUP BY n, relation_type
    """,
    "qa.subset_share_cv": """
        CREATE OR REPLACE VIEW qa.subset_share_cv AS
        SELECT relation_type, count(*) AS subsets, avg(share) AS mean_share,
               stddev_pop(share) AS std_share, stddev_pop(share) / avg(share) AS cv
        FROM qa.subset_relation_shares GROUP BY relation_type
    """,
    "qa.subset_summary": """
        CREATE OR REPLACE VIEW qa.subset_summary AS
        SELECT n, count(*) AS rows, avg(answer_chars) AS avg_answer_chars,
               avg(question_chars) AS avg_question_chars,
               count(DISTINCT category) AS categories_covered,
               count(DISTINCT relation_type) AS relation_types
        FROM qa.training_subset GROUP BY n
    """,
    "qa.subset_nesting": """
        CREATE OR REPLACE VIEW qa.subset_nesting AS
        WITH sizes AS (SELECT n, count(*) AS rows FROM qa.training_subset GROUP BY n),
        shared AS (
            SELECT small.n AS n_small, large.n AS n_large, count(*) AS contained
            FROM qa.training_subset AS small
            JOIN qa.training_subset AS large
              ON small.qa_id = large.qa_id AND small.position = large.position AND small.n < large.n
            GROUP BY small.n, large.n
        )
        SELECT s.n AS n_small, l.n AS n_large, s.rows AS small_rows,
               coalesce(shared.contained, 0) AS contained,
               coalesce(shared.contained, 0) = s.rows AS nested
        FROM sizes AS s JOIN sizes AS l ON s.n < l.n
        LEFT JOIN shared ON shared.n_small = s.n AND shared.n_large = l.n
    """,
}
