"""The dataset stage as Dagster assets and checks, materialized on the shipped seed graph (demo n grid)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
import polars as pl
import pytest
import yaml
from pydantic import Field

from jpslm_assets import artifacts
from jpslm_assets.artifacts import artifact_record
from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.metadata import table_rows
from jpslm_assets.qa import assets as qa
from jpslm_assets.resources.generation import GenerationBackend
from jpslm_assets.resources.qa_files import package_file
from jpslm_assets.settings import load_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.test_qa_generation import KG, TEMPLATES

REPO = Path(__file__).resolve().parents[1]
DEMO_N = load_profile("demo").n_grid
DEMO_GRID = [str(n) for n in DEMO_N]


# Stand-ins for the kg stage's assets: same keys and tables, read from the shipped seed files.
@dg.asset(key="kg_nodes", metadata=table_metadata("kg.nodes"))
def seed_kg_nodes() -> pl.DataFrame:
    return pl.read_ndjson(KG / "nodes.jsonl")


@dg.asset(key="kg_relations", metadata=table_metadata("kg.relations"))
def seed_kg_relations() -> pl.DataFrame:
    return pl.read_ndjson(KG / "relations.jsonl")


class CountingRephraser(GenerationBackend):
    """A generation backend that logs every call to a file (Dagster may copy resources; a file survives)."""

    backend_name: ClassVar[str] = "counting_fake"
    log_path: str = Field(description="one line per generate() call")

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        question = request.messages[-1]["content"].split("質問：", 1)[1]
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(question + "\n")
        return GenerationResult(
            text="言い換え：" + question.replace("ですか。", "でしょうか。"),
            prompt_tokens=10,
            completion_tokens=10,
            seconds=0.0,
            finish_reason="stop",
            backend=self.backend_name,
            model=model_ref,
        )

    def calls(self) -> int:
        path = Path(self.log_path)
        return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


UNPARTITIONED = [seed_kg_nodes, seed_kg_relations, qa.qa_pool, qa.rebalanced_pool, qa.test_set]
EVERY_ASSET = [*UNPARTITIONED, qa.training_subset]
SUBSET_CHECKS = [
    qa.training_subset_is_nested,
    qa.relation_shares_stable_across_n,
    qa.answer_length_stable_across_n,
    qa.category_coverage_stable_across_n,
]


def resources(store: DuckDBStore, tmp_path: Path, **qa_files: str) -> dict[str, Any]:
    return {
        "store": store,
        "io_manager": DuckDBTableIOManager(store=store),
        "qa_files": qa.QADataFiles(**qa_files),
        "rephraser": CountingRephraser(log_path=str(tmp_path / "rephraser-calls.log")),
    }


def failure_text(result: dg.ExecuteInProcessResult, step: str) -> str:
    """Every message in the cause chain of the step's failure (Dagster wraps the user's exception)."""
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == step
    messages, error = [], failure.event_specific_data.error
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def checks_by_name(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def materialization_metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_dataset_stage_end_to_end(store: DuckDBStore, tmp_path: Path, data_dir: Path) -> None:
    res = resources(store, tmp_path)
    first = dg.materialize(
        [
            *UNPARTITIONED,
            qa.qa_pool_is_clean,
            qa.qa_pool_matches_paper_shape,
            qa.test_set_composition,
            qa.test_set_has_no_lexical_overlap,
            qa.reference_answers_overlap_training,
        ],
        resources=res,
    )
    assert first.success
    checks = checks_by_name(first)
    overlap = checks.pop("reference_answers_overlap_training")
    assert all(checks[name].passed for name in checks), {n: c.passed for n, c in checks.items()}
    assert len(checks) == 4
    # The shipped references restate graph facts; those repeating a 30-character clause are reported, as a
    # warning, and stay in the evaluation.
    assert not overlap.passed and overlap.severity == dg.AssetCheckSeverity.WARN
    assert overlap.metadata["evaluated_references"].value == 100
    assert 0 < overlap.metadata["overlapping_references"].value < 100
    assert overlap.metadata["longest_run_chars"].value >= 30
    assert overlap.metadata["longest_run_chars_unmasked"].value >= overlap.metadata["longest_run_chars"].value

    pool_meta = materialization_metadata(first, "qa_pool")
    assert pool_meta["paper_pool_size"] == 5578
    assert abs(pool_meta["pool_size"] - 5578) / 5578 < 0.01
    shares = {row["relation_type"]: row for row in table_rows(pool_meta["relation_shares_vs_paper"])}
    assert shares["HAS_CHAPTER"]["templates"] == 34 and shares["HAS_CHAPTER"]["paper_count"] == 1365
    assert pool_meta["rephrase"] == "off"
    rebalanced_meta = materialization_metadata(first, "rebalanced_pool")
    assert rebalanced_meta["HAS_CHAPTER_share"].startswith("24.5% -> 18.")
    before_after = {row["relation_type"]: row for row in table_rows(rebalanced_meta["shares_before_after"])}
    assert before_after["HAS_CHAPTER"]["paper_stated_share"] == "17.1%"
    assert "956 / 5,578" in rebalanced_meta["shares_before_after_note"]

    for n in DEMO_GRID:
        run = dg.materialize(
            [*EVERY_ASSET, *SUBSET_CHECKS], selection=["training_subset"], resources=res, partition_key=n
        )
        assert run.success
        assert checks_by_name(run)["training_subset_is_nested"].passed
    final = checks_by_name(run)
    assert all(check.passed for check in final.values()), {n: c.passed for n, c in final.items()}
    stability = {k: v.value for k, v in final["relation_shares_stable_across_n"].metadata.items()}
    assert "PRECEDES" in stability["integer_limited_types"]
    assert stability["qa_relation_shares_by_n_figure"].startswith("![Figure 2](data:image/png;base64,")
    assert final["answer_length_stable_across_n"].metadata["within_paper_band"].value is True
    for figure in ("qa_relation_shares_by_n", "qa_answer_length_by_n", "qa_quality_summary"):
        assert (data_dir / "artifacts" / "plots" / f"{figure}.png").stat().st_size > 10_000

    # Tables and SQL views a user can query.
    subsets = store.query("SELECT * FROM qa.training_subset ORDER BY n, position")
    assert subsets.group_by("n").len().sort("n")["len"].to_list() == DEMO_N
    nesting = store.query("SELECT * FROM qa.subset_nesting ORDER BY n_small, n_large")
    assert nesting.height == 3 and nesting["nested"].all()
    summary = store.query("SELECT * FROM qa.subset_summary ORDER BY n")
    assert (summary["categories_covered"] == 8).all()
    assert summary["avg_answer_chars"].is_between(360, 400).all()
    shares = store.query("SELECT * FROM qa.relation_shares")
    assert set(shares["stage"]) == {"pool", "rebalanced"} and shares.height == 22
    cv = store.query("SELECT * FROM qa.subset_share_cv")
    assert cv.height == 11

    # The chat JSONL files match the table rows and the recorded checksums.
    for n in (DEMO_N[0], DEMO_N[-1]):
        rows = subsets.filter(pl.col("n") == n)
        path = Path(rows["artifact_path"][0])
        assert path == data_dir / "artifacts" / "subsets" / f"subset_merged_{n}.jsonl"
        assert artifact_record(path)["artifact_sha256"] == rows["artifact_sha256"][0]
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [r["id"] for r in records] == rows["qa_id"].to_list()
        assert records[0]["messages"][1]["content"] == rows["answer"][0]
    assert not list((data_dir / "artifacts" / "subsets").glob("*.partial"))

    # Leakage, now against the materialized subsets too; the verdicts are kept in DuckDB.
    again = dg.materialize(
        [*EVERY_ASSET, qa.test_set_has_no_lexical_overlap], selection=["test_set"], resources=res
    )
    leakage = checks_by_name(again)["test_set_has_no_lexical_overlap"]
    assert leakage.passed
    assert leakage.metadata["largest_overlap_chars"].value < 8
    verdicts = store.query("SELECT * FROM qa.leakage_checks ORDER BY against")
    assert verdicts["against"].to_list() == [
        "rebalanced_pool",
        *sorted(f"training_subset n={n}" for n in DEMO_N),
    ]
    assert verdicts["passed"].all() and (verdicts["leaking_questions"] == 0).all()
    test_set = store.query("SELECT * FROM qa.test_set")
    assert test_set.height == 200 and test_set["human_written"].sum() == 100
    overlap_rows = store.query("SELECT against, count(*) AS questions FROM qa.reference_overlap GROUP BY 1")
    assert overlap_rows.height == 1 and overlap_rows["questions"].to_list() == [200]  # the pool, first run

    # Re-materializing the pool from the same graph and templates gives the same data version.
    dg.materialize(UNPARTITIONED, selection=["qa_pool"], resources=res)
    versions = store.query(
        "SELECT data_version FROM lineage.materializations WHERE asset_key = 'qa_pool' ORDER BY materialized_at"
    )["data_version"].to_list()
    assert len(versions) == 2 and versions[0] == versions[1]
    upstream = store.query(
        "SELECT DISTINCT upstream_asset_key FROM lineage.inputs WHERE asset_key = 'training_subset'"
    )["upstream_asset_key"].to_list()
    assert upstream == ["rebalanced_pool"]


def test_rephrasing_through_the_asset_calls_the_model_once_per_prompt(
    store: DuckDBStore, tmp_path: Path
) -> None:
    res = resources(store, tmp_path)
    rephraser: CountingRephraser = res["rephraser"]
    config = {
        "ops": {
            "qa_pool": {"config": {"rephrase": True, "rephrase_model": "fake-model", "rephrase_limit": 30}}
        }
    }
    first = dg.materialize(UNPARTITIONED[:3], resources=res, run_config=config)
    assert first.success
    assert rephraser.calls() == 30
    stats = materialization_metadata(first, "qa_pool")["rephrase"]
    assert stats["model_calls"] == 30 and stats["cache_hits"] == 0 and stats["accepted"] > 0
    cache = store.query("SELECT * FROM qa.rephrase_cache")
    assert cache.height == 30 and cache["prompt_hash"].n_unique() == 30
    pool = store.query("SELECT * FROM qa.pool")
    assert pool["rephrased"].sum() == stats["accepted"]

    second = dg.materialize(UNPARTITIONED[:3], resources=res, run_config=config)
    assert rephraser.calls() == 30  # every prompt came from the cache
    assert materialization_metadata(second, "qa_pool")["rephrase"]["cache_hits"] == 30
    assert store.query("SELECT * FROM qa.pool").sort("qa_id").equals(pool.sort("qa_id"))

    config["ops"]["qa_pool"]["config"]["rephrase_limit"] = 45
    dg.materialize(UNPARTITIONED[:3], resources=res, run_config=config)
    assert rephraser.calls() == 45
    assert store.query("SELECT count(*) AS n FROM qa.rephrase_cache")["n"][0] == 45


def _bad_templates(tmp_path: Path) -> Path:
    raw = yaml.safe_load(TEMPLATES.read_text(encoding="utf-8"))
    raw["relation_types"]["HAS_ITEM"]["templates"][4]["question"] = (
        "「{source_name}」の{target_title}は何ですか。"
    )
    path = tmp_path / "bad_templates.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def _bad_test_set(tmp_path: Path) -> Path:
    lines = (package_file("test_set_200.jsonl")).read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[41])
    del broken["category"]
    lines[41] = json.dumps(broken, ensure_ascii=False)
    path = tmp_path / "bad_test_set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("setting", "make_file", "asset", "message"),
    [
        (
            "templates_path",
            _bad_templates,
            "qa_pool",
            r"HAS_ITEM\.q05 \(question\): unknown placeholder \{target_title\}",
        ),
        ("test_set_path", _bad_test_set, "test_set", r"line 42 \(question TS-042\): missing 'category'"),
    ],
)
def test_bad_input_fails_clearly_and_keeps_the_previous_table(
    store: DuckDBStore, tmp_path: Path, setting: str, make_file: Any, asset: str, message: str
) -> None:
    assert dg.materialize(UNPARTITIONED, resources=resources(store, tmp_path)).success
    table = {"qa_pool": "qa.pool", "test_set": "qa.test_set"}[asset]
    before = store.query(f"SELECT * FROM {table}")

    bad = resources(store, tmp_path, **{setting: str(make_file(tmp_path))})
    result = dg.materialize(UNPARTITIONED, selection=[asset], resources=bad, raise_on_error=False)
    assert not result.success
    assert re.search(message, failure_text(result, asset))
    assert store.query(f"SELECT * FROM {table}").equals(before)


def test_n_larger_than_the_pool_fails_clearly(tmp_path: Path) -> None:
    """A profile grid with n beyond the pool: the partition fails naming n, the pool size and the setting."""
    script = textwrap.dedent(
        f"""
        import dagster as dg
        from jpslm_assets.qa import assets as qa
        from jpslm_assets.io_manager import DuckDBTableIOManager
        from jpslm_assets.store import DuckDBStore
        from jpslm_assets_tests.test_qa_assets import EVERY_ASSET, UNPARTITIONED, failure_text, resources
        from pathlib import Path
        store = DuckDBStore(path={str(tmp_path / "grid.duckdb")!r})
        res = resources(store, Path({str(tmp_path)!r}))
        assert dg.materialize(UNPARTITIONED, selection=["qa_pool", "rebalanced_pool", "kg_nodes", "kg_relations"], resources=res).success
        result = dg.materialize(EVERY_ASSET, selection=["training_subset"], resources=res, partition_key="9000", raise_on_error=False)
        print("FAILURE:", failure_text(result, "training_subset").replace("\\n", " "))
        """
    )
    env = {**os.environ, "JPSLM_N_GRID": "[60, 9000]", "JPSLM_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("FAILURE:")]
    assert "n=9000 is larger than the rebalanced pool (5150 pairs)" in line
    assert "JPSLM_N_GRID" in line


@pytest.mark.slow
def test_rephrasing_with_the_real_small_model(store: DuckDBStore, tmp_path: Path) -> None:
    """SmolLM2-135M through embedded llama.cpp: real calls, real cache; its Japanese is poor, and the
    acceptance rules are expected to reject most rewrites rather than let them into the pool."""
    from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend

    res = resources(store, tmp_path)
    res["rephraser"] = LlamaCppBackend(n_ctx=1024)
    config = {
        "ops": {"qa_pool": {"config": {"rephrase": True, "rephrase_limit": 2, "rephrase_versions": ["v4"]}}}
    }
    first = dg.materialize(UNPARTITIONED[:3], resources=res, run_config=config)
    stats = materialization_metadata(first, "qa_pool")["rephrase"]
    assert stats["model"].endswith(".gguf") and stats["backend"] == "LlamaCppBackend"
    assert stats["model_calls"] == 2 and stats["accepted"] + sum(stats["rejected"].values()) == 2
    cache = store.query("SELECT * FROM qa.rephrase_cache")
    assert cache.height == 2 and (cache["completion_tokens"] > 0).all()

    second = dg.materialize(UNPARTITIONED[:3], resources=res, run_config=config)
    again = materialization_metadata(second, "qa_pool")["rephrase"]
    assert again["model_calls"] == 0 and again["cache_hits"] == 2


def test_file_writes_are_atomic(tmp_path: Path) -> None:
    target = tmp_path / "subsets" / "subset_merged_60.jsonl"
    artifacts.write_atomic(target, "前の内容\n".encode())

    class Interrupted(Exception):
        pass

    original_fdopen = os.fdopen

    def failing_fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        stream = original_fdopen(fd, *args, **kwargs)

        def write(data: bytes) -> int:  # fails half-way, as a full disk or a killed step would
            stream.__class__.write(stream, data[:5])
            raise Interrupted("disk full")

        stream.write = write  # type: ignore[method-assign]
        return stream

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifacts.os, "fdopen", failing_fdopen)
        with pytest.raises(Interrupted):
            artifacts.write_atomic(target, "新しい内容\n".encode())
    assert target.read_text(encoding="utf-8") == "前の内容\n"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no partial file left behind


def test_default_rephrase_model_needs_a_name_outside_llama_cpp() -> None:
    from jpslm_assets.common.generation_types import GenerationError
    from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
    from jpslm_assets.resources.generation_ollama import OllamaBackend

    assert qa.default_rephrase_model(LlamaCppBackend()).endswith(".gguf")
    with pytest.raises(GenerationError, match="rephraser backend is ollama; set qa_pool's rephrase_model"):
        qa.default_rephrase_model(OllamaBackend())
