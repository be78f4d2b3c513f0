"""Fixture data and Dagster stand-ins for the training tests (no tests here).

The stage-1/2 assets read ``qa.rebalanced_pool``, ``qa.training_subset`` and ``qa.test_set``. The tests use
small seeded Japanese QA frames with those columns, written through the same IO manager by stand-in assets
with the same keys, so the training stage is exercised against the documented contract only.
"""

import random
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets.definitions import with_automation
from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.partitions import n_partitions
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training import assets as training

FACILITIES = [
    "堤防",
    "ダム",
    "砂防堰堤",
    "護岸",
    "水門",
    "樋門",
    "床固工",
    "遊水地",
    "排水機場",
    "渓流保全工",
]
ACTIVITIES = ["点検", "設計", "維持管理", "調査", "計画", "補修", "監視", "評価"]
VOLUMES = ["調査編", "計画編", "設計編", "維持管理編"]
RELATIONS = ["HAS_CHAPTER", "DESCRIBED_IN", "SUBJECT_TO", "REQUIRES", "MITIGATES"]
CATEGORIES = ["Survey", "Planning", "Design", "Maintenance-River"]


def qa_pairs(count: int, seed: int = 7) -> pl.DataFrame:
    """``count`` template-like QA pairs about river and sabo facilities, seeded."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        facility, activity, volume = rng.choice(FACILITIES), rng.choice(ACTIVITIES), rng.choice(VOLUMES)
        chapter = rng.randint(1, 12)
        rows.append(
            {
                "qa_id": f"QA-{index:05d}",
                "relation_type": rng.choice(RELATIONS),
                "question": f"{facility}の{activity}にはどの基準が適用されますか？",
                "answer": (
                    f"{facility}の{activity}には河川砂防技術基準{volume}第{chapter}章の基準が適用されます。"
                    f"{facility}は洪水や土砂災害から地域を守る施設であり、{activity}は定められた手順で行います。"
                ),
                "category": rng.choice(CATEGORIES),
            }
        )
    return pl.DataFrame(rows)


def training_subset_frame(pool: pl.DataFrame, n: int) -> pl.DataFrame:
    """The first ``n`` pairs of the pool, with ``n`` and ``position`` as qa.training_subset has them."""
    head = pool.head(n)
    return head.with_columns(
        pl.lit(n, dtype=pl.Int64).alias("n"), pl.int_range(0, head.height, dtype=pl.Int64).alias("position")
    ).select("n", "qa_id", "position", pl.exclude("n", "qa_id", "position"))


def eval_questions_frame(count: int = 24, seed: int = 11) -> pl.DataFrame:
    """Held-out questions phrased differently from the pool; the first ``count`` are human_written."""
    rng = random.Random(seed)
    rows = []
    for index in range(count + 4):
        facility, activity, volume = rng.choice(FACILITIES), rng.choice(ACTIVITIES), rng.choice(VOLUMES)
        rows.append(
            {
                "question_id": f"T{index:03d}",
                "category": rng.choice(CATEGORIES),
                "question": f"{activity}を行う{facility}について、根拠となる基準を教えてください。",
                "reference_answer": (
                    f"{facility}の{activity}には河川砂防技術基準{volume}第{rng.randint(1, 12)}章の基準が"
                    f"適用されます。{facility}は地域を守る施設です。"
                ),
                "node_ids": [f"N-{index:03d}"],
                "citation": f"{volume} 第{rng.randint(1, 12)}章",
                "human_written": index < count,
            }
        )
    return pl.DataFrame(rows)


def upstream_assets(pool: pl.DataFrame, tests: pl.DataFrame) -> list[dg.AssetsDefinition]:
    """Stand-ins for the dataset stage's assets (same keys, tables and partitions)."""

    @dg.asset(name="rebalanced_pool", metadata=table_metadata("qa.rebalanced_pool"))
    def rebalanced_pool() -> pl.DataFrame:
        return pool

    @dg.asset(
        name="training_subset",
        partitions_def=n_partitions(),
        metadata=table_metadata("qa.training_subset", partition_expr="n"),
    )
    def training_subset(context: dg.AssetExecutionContext) -> pl.DataFrame:
        return training_subset_frame(pool, int(context.partition_key))

    @dg.asset(name="test_set", metadata=table_metadata("qa.test_set"))
    def test_set() -> pl.DataFrame:
        return tests

    return [rebalanced_pool, training_subset, test_set]


def definitions(
    store: DuckDBStore, pool: pl.DataFrame, tests: pl.DataFrame, **resources: Any
) -> dg.Definitions:
    """The training stage with stand-in upstreams, the shared store and IO manager, in-process executor."""
    stage = training.defs
    definitions = dg.Definitions(
        assets=[*upstream_assets(pool, tests), *(stage.assets or [])],
        asset_checks=list(stage.asset_checks or []),
        jobs=list(stage.jobs or []),
        sensors=list(stage.sensors or []),
        resources={
            **(stage.resources or {}),
            "store": store,
            "io_manager": DuckDBTableIOManager(store=store),
            **resources,
        },
        executor=dg.in_process_executor,
    )
    return with_automation(definitions)


TINY_RUN = {
    "max_steps": 2,
    "per_device_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 96,
}
