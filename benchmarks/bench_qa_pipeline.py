"""Benchmark: knowledge graph -> QA pool -> rebalanced pool -> every nested subset, timed per stage.

Runs the same plain functions the Dagster assets call, on the shipped seed graph (the paper's size: 268
relations, ~5,600 pairs, n grid 1000..5000) and on a synthetic graph 100x larger (the seed repeated with
distinct node names, n grid scaled by 100). Prints seconds per stage and the ratio between the two sizes.

    python benchmarks/bench_qa_pipeline.py            # both sizes
    python benchmarks/bench_qa_pipeline.py --scale 10 # a different synthetic size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "jpslm_assets" / "data"
PAPER_GRID = [1000, 2000, 3000, 4000, 5000]


def seed_graph() -> tuple[pl.DataFrame, pl.DataFrame]:
    def read(name: str) -> pl.DataFrame:
        lines = (DATA / "kg" / name).read_text(encoding="utf-8").splitlines()
        return pl.DataFrame([json.loads(line) for line in lines if line])

    return read("nodes.jsonl"), read("relations.jsonl")


def scaled_graph(
    nodes: pl.DataFrame, relations: pl.DataFrame, copies: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The seed graph's structure repeated ``copies`` times with distinct content in every copy.

    Copy k prefixes every node name with its own basin ("流域0007の堤防") and deals the descriptions of nodes
    of the same label out in a seeded random order, so pairs from different copies are not near-duplicates
    of each other (a plain copy would be, and deduplication would rightly remove it).
    """
    import numpy as np

    rng = np.random.default_rng(7)
    node_copies, relation_copies = [], []
    for k in range(copies):
        suffix = f"-{k:04d}"
        dealt = nodes.with_columns(
            pl.col("description").shuffle(seed=int(rng.integers(1 << 31))).over("label").alias("description")
        )
        node_copies.append(
            dealt.with_columns(
                (pl.col("node_id") + suffix).alias("node_id"),
                (pl.lit(f"流域{k:04d}の") + pl.col("name")).alias("name"),
            )
        )
        relation_copies.append(
            relations.with_columns(
                (pl.col("relation_id") + suffix).alias("relation_id"),
                (pl.col("source_id") + suffix).alias("source_id"),
                (pl.col("target_id") + suffix).alias("target_id"),
            )
        )
    return pl.concat(node_copies), pl.concat(relation_copies)


class StageClock:
    """Wall-clock and CPU seconds per stage (CPU time is steadier on a shared, loaded machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._started = (time.perf_counter(), time.process_time())
        self._mark = self._started

    def lap(self, stage: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[stage] = now[0] - self._mark[0]
        self.cpu[stage] = now[1] - self._mark[1]
        self._mark = now

    def finish(self) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall["total"] = now[0] - self._started[0]
        self.cpu["total"] = now[1] - self._started[1]


def run_pipeline(
    nodes: pl.DataFrame, relations: pl.DataFrame, grid: list[int] | None = None
) -> tuple[StageClock, dict[str, int]]:
    """The whole chain; ``grid`` None scales the paper's grid to the rebalanced pool's size."""
    from jpslm_assets.qa import generation as qa_generation
    from jpslm_assets.qa import subsets as qa_subsets
    from jpslm_assets.qa.templates import load_catalogue

    clock = StageClock()
    catalogue = load_catalogue(DATA / "qa_templates.yaml")
    clock.lap("load templates")
    raw, _ = qa_generation.expand_templates(nodes, relations, catalogue)
    clock.lap("expand templates")
    pool, dedup = qa_generation.deduplicate(raw, catalogue)
    clock.lap("dedup (exact + MinHash LSH)")
    rebalanced = qa_subsets.rebalance(pool, catalogue.rebalance.keep_fraction, catalogue.rebalance.seed).frame
    clock.lap("rebalance")
    ordered = qa_subsets.nested_order(rebalanced, catalogue.subsets.seed)
    if grid is None:
        # Same fractions of the pool as the paper's 1000..5000 of 5,169 (dedup may shrink a copied graph).
        grid = [n * rebalanced.height // 5169 for n in PAPER_GRID]
    subsets = [qa_subsets.take_subset(ordered, n) for n in grid]
    clock.lap("nested subsets (all n)")
    for subset in subsets:
        qa_subsets.chat_lines(subset)
    clock.lap("chat JSONL lines (all n)")
    clock.finish()
    sizes = {
        "relations": relations.height,
        "raw": raw.height,
        "pool": pool.height,
        "exact_removed": dedup.exact_removed,
        "near_removed": dedup.near_removed,
        "rebalanced": rebalanced.height,
        "largest_n": max(grid),
    }
    return clock, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=100, help="copies of the seed graph for the large run")
    args = parser.parse_args()

    mark = time.perf_counter()
    import datasketch  # noqa: F401  (imported once here so the timings below exclude import cost)
    import rapidfuzz  # noqa: F401
    import scipy.stats  # noqa: F401

    from jpslm_assets.qa import generation as qa_generation  # noqa: F401

    import_seconds = time.perf_counter() - mark

    nodes, relations = seed_graph()
    paper, paper_sizes = run_pipeline(nodes, relations, PAPER_GRID)
    big_nodes, big_relations = scaled_graph(nodes, relations, args.scale)
    big, big_sizes = run_pipeline(big_nodes, big_relations)

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"imports (datasketch, rapidfuzz, scipy, polars): {import_seconds:.2f} s, not counted below")
    for label, sizes in (("paper size", paper_sizes), (f"x{args.scale}", big_sizes)):
        print(
            f"{label:>10}: {sizes['relations']} relations -> {sizes['raw']} raw pairs -> {sizes['pool']} pool "
            f"({sizes['exact_removed']} exact, {sizes['near_removed']} near duplicates) -> "
            f"{sizes['rebalanced']} rebalanced; subsets up to n={sizes['largest_n']}"
        )
    print(
        f"{'stage':30} {'paper wall':>11} {'paper cpu':>10} {'x' + str(args.scale) + ' wall':>10} "
        f"{'x' + str(args.scale) + ' cpu':>10} {'cpu ratio':>10}"
    )
    for stage in paper.wall:
        ratio = big.cpu[stage] / paper.cpu[stage] if paper.cpu[stage] > 0 else float("nan")
        print(
            f"{stage:30} {paper.wall[stage]:11.3f} {paper.cpu[stage]:10.3f} {big.wall[stage]:10.3f} "
            f"{big.cpu[stage]:10.3f} {ratio:10.1f}"
        )
    budget = 5.0
    verdict = "within" if paper.wall["total"] <= budget else "OVER"
    print(f"paper-size total {paper.wall['total']:.2f} s wall: {verdict} the {budget:.0f} s budget")


if __name__ == "__main__":
    main()
