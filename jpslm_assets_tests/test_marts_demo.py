"""Demo profile, judging to marts with the real embedded judge (SmolLM2-135M GGUF via llama.cpp).

Answers are stand-ins (the answering stage has its own tests): for each demo model and format, a few test
questions answered with text derived from the reference answers, written through the project's IO
manager. The judge assets then score them for real, and the marts must hold a score_summary row per demo
model and format with its interval filled, and the SQL tests must pass.
"""

from importlib import resources

import dagster as dg
import polars as pl
import pytest

from jpslm_assets.export.assets_partition import stage3_metadata
from jpslm_assets.export.tables import GGUF_FORMATS
from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.judging import assets as judging
from jpslm_assets.marts import assets as marts
from jpslm_assets.marts.sql_project import load_project
from jpslm_assets.partitions import stage3_partitions
from jpslm_assets.settings import load_profile
from jpslm_assets.store import DuckDBStore

QUESTIONS = 2
N = 20


def packaged_frame(*path: str) -> pl.DataFrame:
    return pl.read_ndjson(resources.files("jpslm_assets").joinpath("data", *path).read_bytes())


def stand_in_answers(fmt: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=f"answers_{fmt}",
        partitions_def=stage3_partitions(),
        metadata=stage3_metadata("eval.answers", fmt),
    )
    def answers(context: dg.AssetExecutionContext) -> pl.DataFrame:
        model = context.partition_key
        questions = packaged_frame("test_set_200.jsonl").filter(pl.col("human_written")).head(QUESTIONS)
        # Vary the text by model and format so the judge sees different answers.
        keep = {"tiny-llama": 20, "tiny-qwen2": 60, "smollm2-135m": 200}[model] // (
            2 if fmt == "q4_k_m" else 1
        )
        text = questions["reference_answer"].str.slice(0, keep)
        return questions.select("question_id", "category").with_columns(
            answer=text, chars=text.str.len_chars().cast(pl.Int64), tokens=pl.lit(20), seconds=pl.lit(0.5),
            model=pl.lit(model), n=pl.lit(N, dtype=pl.Int64), stage=pl.lit(2, dtype=pl.Int64),
        )

    return answers


@pytest.mark.slow
def test_demo_judging_fills_score_summary_for_every_model_and_format(store: DuckDBStore) -> None:
    profile = load_profile("demo")
    formats = list(GGUF_FORMATS)

    @dg.asset(key="test_set", metadata=table_metadata("qa.test_set"))
    def test_set() -> pl.DataFrame:
        return packaged_frame("test_set_200.jsonl")

    @dg.asset(key="kg_nodes", metadata=table_metadata("kg.nodes"))
    def kg_nodes() -> pl.DataFrame:
        return packaged_frame("kg", "nodes.jsonl")

    resources_ = {
        "store": store,
        "io_manager": DuckDBTableIOManager(store=store),
        "judge": judging.judge_resource_for(profile),
    }
    assert dg.materialize([test_set, kg_nodes], resources=resources_).success
    for fmt in formats:
        assets = [test_set, kg_nodes, stand_in_answers(fmt), judging.build_judge_scores(fmt),
                  judging.build_citation_grounding(fmt)]  # fmt: skip
        for model in profile.models:
            run = dg.materialize(
                assets,
                selection=[f"answers_{fmt}", f"judge_scores_{fmt}", f"citation_grounding_{fmt}"],
                partition_key=model,
                resources=resources_,
            )
            assert run.success
    scores = store.query("SELECT * FROM eval.judge_scores")
    assert scores.height == len(profile.models) * len(formats) * QUESTIONS
    assert scores["judge"].unique().to_list() == ["smollm2-135m/llama_cpp/en"]
    assert scores.filter(pl.col("parse_ok"))["score"].is_between(0, 3).all()

    run = dg.materialize([marts.build_marts_assets(load_project(), {})], resources=resources_)
    assert run.success
    failed = [
        c.check_name
        for c in run.get_asset_check_evaluations()
        if not c.passed and c.severity.value == "ERROR"
    ]
    assert failed == []
    summary = store.query("SELECT * FROM marts.score_summary")
    assert {(r["model"], r["format"]) for r in summary.iter_rows(named=True)} == {
        (model, fmt) for model in profile.models for fmt in formats
    }
    assert summary["ci_low"].null_count() == 0 and summary["ci_high"].null_count() == 0
    assert (summary["ci_low"] <= summary["avg_score"]).all() and (
        summary["avg_score"] <= summary["ci_high"]
    ).all()
    citations = store.query("SELECT * FROM marts.citation_summary")
    assert citations.height == len(profile.models) * len(formats)
    # The longest stand-in answers quote the reference's 出典 line, so they cite the right place.
    smollm2 = citations.filter((pl.col("model") == "smollm2-135m") & (pl.col("format") == "f16")).row(
        0, named=True
    )
    assert smollm2["citing"] == QUESTIONS and smollm2["matching"] == QUESTIONS
