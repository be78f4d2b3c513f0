"""Small, deterministic frames shaped like the stage tables (docs/architecture.md), and a toy code location.

Report and schedule tests write these frames to a temporary DuckDB file through ``DuckDBStore.write_slice``
and read them back through the same code the assets use. ``reevaluation_location`` is a complete code
location (answers -> judge -> mart assets writing the contract tables, the real report assets and the real
re-evaluation schedule); the daemon test loads it with ``dagster-daemon``.
"""

import math
import os

import dagster as dg
import polars as pl

from jpslm_assets.io_manager import DuckDBTableIOManager
from jpslm_assets.store import DuckDBStore

RELATION_TYPES = ["HAS_CHAPTER", "DESCRIBED_IN", "HAS_SECTION", "SUBJECT_TO", "REQUIRES"]
CATEGORIES = ["調査", "計画", "設計", "維持管理-河川"]
MODELS = ["tiny-llama", "smollm2-135m"]
FORMATS = ["f16", "q4_k_m"]
N = 120
JUDGE = "smollm2-135m"


def _scores(model: str, fmt: str, questions: int = 12) -> list[int]:
    """A fixed score pattern per series, so averages differ between models and formats."""
    shift = MODELS.index(model) + 2 * FORMATS.index(fmt)
    return [(q * 7 + shift) % 4 for q in range(questions)]


def sample_frames() -> dict[str, pl.DataFrame]:
    relations = pl.DataFrame(
        {
            "relation_id": [f"R{i:03d}" for i in range(30)],
            "source_id": [f"N{i:03d}" for i in range(30)],
            "relation_type": [RELATION_TYPES[i % 5] if i % 6 else "HAS_CHAPTER" for i in range(30)],
            "target_id": [f"N{i + 1:03d}" for i in range(30)],
            "description": ["説明"] * 30,
        }
    )
    answers = ["堤防の点検は年一回以上行う。" * (1 + i % 3) for i in range(90)]
    pool = pl.DataFrame(
        {
            "qa_id": [f"QA{i:03d}" for i in range(90)],
            "relation_type": [RELATION_TYPES[i % 5] if i % 4 else "HAS_CHAPTER" for i in range(90)],
            "question": [f"質問{i}は?" for i in range(90)],
            "answer": answers,
            "category": [CATEGORIES[i % 4] for i in range(90)],
            "answer_chars": [len(a) for a in answers],
        }
    )
    rebalanced = pool.filter(
        ~((pl.col("relation_type") == "HAS_CHAPTER") & (pl.int_range(pl.len()) % 8 == 0))
    )
    subset = pl.concat(
        [rebalanced.head(n).with_columns(pl.lit(n).alias("n"), pl.int_range(1, n + 1).alias("position"))
         for n in (30, 60)]
    )  # fmt: skip
    loss = pl.DataFrame(
        [
            {
                "model": m,
                "n": n,
                "stage": stage,
                "step": s,
                "loss": 2.0 * math.exp(-s / 6) + 0.5 + 0.01 * (s % 3),
            }
            for m in MODELS
            for n, stage in ((30, 1), (60, 1), (60, 2))
            for s in range(1, n // 6 + 1)
        ]
    )
    scale = pl.DataFrame(
        [
            {
                "model": m,
                "n": n,
                "train_loss_final": 1.2 - n / 200,
                "test_nll": 1.4 - (0.1 if n == 60 else 0.0) + 0.05 * MODELS.index(m),
                "test_ppl": math.exp(1.4 - (0.1 if n == 60 else 0.0) + 0.05 * MODELS.index(m)),
                "delta_nll": 0.0,
                "status": "optimal" if n == 60 else "underfit",
                "is_optimal": n == 60,
            }
            for m in MODELS
            for n in (30, 60, 90)
        ]
    )
    judge, summary, distribution, categories = [], [], [], []
    for model in MODELS:
        for fmt in FORMATS:
            scores = _scores(model, fmt)
            for q, score in enumerate(scores):
                parsed = q != 3  # one unparsed judge output per series: NULL score, never 0
                judge.append(
                    {
                        "model": model, "n": N, "format": fmt, "question_id": f"T{q:03d}",
                        "category": CATEGORIES[q % 4], "judge": JUDGE, "score": score if parsed else None,
                        "reason": "根拠あり", "parse_ok": parsed, "raw_output": str(score),
                    }
                )  # fmt: skip
            avg = sum(scores) / len(scores)
            summary.append(
                {
                    "model": model, "n": N, "format": fmt, "questions": len(scores), "avg_score": avg,
                    "perfect_rate": scores.count(3) / len(scores), "score0_count": scores.count(0),
                    "avg_chars": 100.0 + 40 * MODELS.index(model), "sec_per_question": 1.5 if fmt == "f16" else 0.6,
                    "size_gb": 0.2 if fmt == "f16" else 0.07, "ci_low": avg - 0.4, "ci_high": min(avg + 0.4, 3.0),
                    "judge": JUDGE,
                }
            )  # fmt: skip
            distribution += [
                {"model": model, "n": N, "format": fmt, "score": s, "count": scores.count(s), "judge": JUDGE}
                for s in range(4)
            ]
            for index, category in enumerate(CATEGORIES):
                mine = scores[index::4]
                categories.append(
                    {"model": model, "n": N, "format": fmt, "category": category,
                     "avg_score": sum(mine) / len(mine), "questions": len(mine), "judge": JUDGE}
                )  # fmt: skip
    quantization = pl.DataFrame(
        [
            {
                "model": m, "n": N, "f16_avg": sum(_scores(m, "f16")) / 12, "q4_avg": sum(_scores(m, "q4_k_m")) / 12,
                "delta": (sum(_scores(m, "q4_k_m")) - sum(_scores(m, "f16"))) / 12, "p_value": 0.5,
                "significant": False, "speedup": 2.5, "size_ratio": 0.35, "judge": JUDGE,
                "delta_ci_low": -0.5, "delta_ci_high": 0.4,
            }
            for m in MODELS
        ]
    )  # fmt: skip
    return {
        "kg.relations": relations,
        "qa.pool": pool,
        "qa.rebalanced_pool": rebalanced,
        "qa.training_subset": subset,
        "train.loss_curve": loss,
        "eval.scale_curve": scale,
        "eval.judge_scores": pl.DataFrame(judge),
        "marts.score_summary": pl.DataFrame(summary),
        "marts.score_distribution": pl.DataFrame(distribution),
        "marts.category_scores": pl.DataFrame(categories),
        "marts.quantization_effect": quantization,
    }


def write_samples(store: DuckDBStore, tables: list[str] | None = None) -> dict[str, pl.DataFrame]:
    frames = sample_frames()
    for table, frame in frames.items():
        if tables is None or table in tables:
            store.write_slice(table, frame, {})
    return frames


def deployments_frame(rows: list[tuple[str, int, str, str]]) -> pl.DataFrame:
    """serve.deployments rows (stage-3 adapter, n, format, status); a plain model key is its stage-2 adapter."""
    return pl.DataFrame(
        [
            {"adapter": m, "stage": 1 if m.endswith("@stage1") else 2, "model": m.split("@")[0], "n": n,
             "format": f, "backend": "llama_cpp", "served_name": f"{m}-{n}-{f}", "modelfile_path": None,
             "status": status}
            for m, n, f, status in rows
        ],
        schema_overrides={"modelfile_path": pl.String},
    )  # fmt: skip


# ------------------------------------------------------------------------------------ toy code location


def reevaluation_location(store_path: str) -> dg.Definitions:
    """Toy answers/judge/mart assets on the real tables, with the real report assets and schedule.

    The per-format assets carry the same ``table`` / ``fixed_columns`` metadata as the real stages, so the
    reports module discovers them exactly as it discovers the real ones.
    """
    from jpslm_assets.export.assets_partition import stage3_metadata
    from jpslm_assets.io_manager import table_metadata
    from jpslm_assets.partitions import stage3_adapter, stage3_partitions
    from jpslm_assets.reports.assets import build_reports_definitions

    partitions = stage3_partitions()
    n_by_model = {"tiny-llama": 40, "smollm2-135m": 60}
    per_format = []
    for fmt in FORMATS:

        def make(fmt: str = fmt) -> list[dg.AssetsDefinition]:
            @dg.asset(
                name=f"answers_{fmt}", group_name="export", partitions_def=partitions, code_version="1",
                metadata=stage3_metadata("eval.answers", fmt),
            )  # fmt: skip
            def answers(context: dg.AssetExecutionContext) -> pl.DataFrame:
                adapter = stage3_adapter(context.partition_key)
                n = n_by_model.get(adapter.model, 20)
                return pl.DataFrame(
                    {"model": adapter.model, "n": n, "format": fmt, "stage": adapter.stage, "question_id": [f"T{q:03d}" for q in range(6)],
                     "category": [CATEGORIES[q % 4] for q in range(6)],
                     "answer": ["点検は年一回" * (q + 1) for q in range(6)]}
                )  # fmt: skip

            @dg.asset(
                name=f"judge_scores_{fmt}", group_name="judging", partitions_def=partitions, code_version="1",
                ins={"answers": dg.AssetIn(f"answers_{fmt}")},
                metadata=stage3_metadata("eval.judge_scores", fmt),
            )  # fmt: skip
            def judge_scores(answers: pl.DataFrame) -> pl.DataFrame:
                return answers.select(
                    "adapter", "stage", "model", "n", "format", "question_id", "category",
                    pl.lit("length-judge").alias("judge"),
                    (pl.col("answer").str.len_chars() // 7).clip(0, 3).cast(pl.Int64).alias("score"),
                    pl.lit("").alias("reason"), pl.lit(True).alias("parse_ok"), pl.lit("").alias("raw_output"),
                )  # fmt: skip

            return [answers, judge_scores]

        per_format += make()

    @dg.asset(
        name="score_summary", group_name="marts", code_version="1",
        deps=[f"judge_scores_{fmt}" for fmt in FORMATS], metadata=table_metadata("marts.score_summary"),
    )  # fmt: skip
    def score_summary(store: DuckDBStore) -> pl.DataFrame:
        return store.query(
            "SELECT model, n, format, count(*) AS questions, avg(score) AS avg_score, "
            "avg(CAST(score = 3 AS DOUBLE)) AS perfect_rate, count(*) FILTER (score = 0) AS score0_count, "
            "0.0 AS avg_chars, 0.0 AS sec_per_question, 0.0 AS size_gb, "
            "avg(score) - 0.5 AS ci_low, avg(score) + 0.5 AS ci_high "
            "FROM eval.judge_scores GROUP BY ALL ORDER BY ALL"
        )

    stage_assets = [*per_format, score_summary]
    stage_defs = dg.Definitions(assets=stage_assets)
    from jpslm_assets.reports.assets import asset_specs

    reports_defs = build_reports_definitions(asset_specs([stage_defs]))
    store = DuckDBStore(path=store_path, lock_timeout_s=30)
    return dg.Definitions.merge(
        stage_defs,
        reports_defs,
        dg.Definitions(
            resources={"store": store, "io_manager": DuckDBTableIOManager(store=store)},
            executor=dg.in_process_executor,
        ),
    )


def _location_from_env() -> dg.Definitions | None:
    path = os.environ.get("JPSLM_DUCKDB_PATH")
    return reevaluation_location(path) if path else None


# Loaded by `dagster-daemon run -m jpslm_assets_tests.report_samples -a location` in the daemon test.
location = _location_from_env()
