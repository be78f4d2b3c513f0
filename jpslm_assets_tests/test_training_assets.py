"""Stages 1 and 2 as Dagster assets and jobs, on tiny-llama with stand-in dataset assets; n* as data that
Dagster's automation reacts to."""

import importlib
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from jpslm_assets import settings
from jpslm_assets.settings import current_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training import assets as training
from jpslm_assets.training import scaling
from jpslm_assets.training.tables import OPTIMAL_SCALE_TABLE, SCALE_CURVE_TABLE
from jpslm_assets_tests.test_training_support import TINY_RUN, definitions, eval_questions_frame, qa_pairs

RUN_COLUMNS = {
    "model", "n", "stage", "backend", "precision", "precision_reason", "r", "alpha", "dropout", "steps",
    "train_loss_final", "train_loss_avg", "minutes", "tokens_per_s", "base_model_ref", "artifact_path",
    "artifact_bytes", "artifact_sha256",
}  # fmt: skip


class Pipeline:
    """The training stage over stand-in upstreams, one ephemeral instance, helpers to materialize."""

    def __init__(self, store: DuckDBStore) -> None:
        self.store = store
        self.defs = definitions(store, qa_pairs(200), eval_questions_frame())
        self.instance = dg.DagsterInstance.ephemeral()
        self.assets = list(self.defs.assets or [])

    def asset(self, name: str) -> Any:
        return next(a for a in self.assets if a.key.path[-1] == name)

    def materialize(
        self, names: list[str], partition: str | None = None, **kwargs: Any
    ) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            self.assets,
            selection=[self.asset(name) for name in names],
            partition_key=partition,
            resources=self.defs.resources,
            instance=self.instance,
            **kwargs,
        )

    def prepare(self, model: str = "tiny-llama") -> None:
        assert self.materialize(["rebalanced_pool", "test_set"]).success
        for n in current_profile().n_grid:
            assert self.materialize(["training_subset"], str(n)).success
        assert self.materialize(["model_architecture", "base_model"], model).success

    def stage1(self, n: int, job: bool = False, raise_on_error: bool = True, **config: Any) -> Any:
        run_config = {"ops": {"stage1_lora_adapter": {"config": {**TINY_RUN, **config}}}}
        if job:
            return self.defs.resolve_job_def("stage1_scale_sweep").execute_in_process(
                partition_key=str(n), run_config=run_config, instance=self.instance, resources=self.defs.resources
            )
        return self.materialize(
            ["stage1_lora_adapter", "stage1_test_nll"], str(n), run_config=run_config, raise_on_error=raise_on_error
        )

    def stage2(self, model: str) -> dg.ExecuteInProcessResult:
        run_config = {"ops": {"stage2_lora_adapter": {"config": TINY_RUN}}}
        return self.materialize(["stage2_lora_adapter", "stage2_test_nll"], model, run_config=run_config)

    def automation(self, cursor: Any = None) -> Any:
        return dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=cursor)


@pytest.fixture
def pipeline(store: DuckDBStore) -> Pipeline:
    return Pipeline(store)


def _condition_labels_true(result: Any, key: str, partition: str) -> set[str]:
    """Labels of the automation sub-conditions that held for one asset partition in an evaluation."""
    labels: set[str] = set()

    def walk(node: Any) -> None:
        label = node.condition.get_label()
        if label and partition in set(node.true_subset.expensively_compute_partition_keys() or []):
            labels.add(label)
        for child in node.child_results:
            walk(child)

    for item in result.results:
        if item.key == dg.AssetKey(key):
            walk(item)
    return labels


def test_stage1_then_stage2_with_n_star_as_data(pipeline: Pipeline, store: DuckDBStore) -> None:
    profile = current_profile()
    pipeline.prepare()

    architecture = store.query("SELECT * FROM train.model_architecture").row(0, named=True)
    assert (architecture["heads"], architecture["kv_heads"], architecture["attention_kind"]) == (8, 2, "GQA")
    base = store.query("SELECT * FROM train.base_models").row(0, named=True)
    assert Path(base["base_model_ref"], "tokenizer.model").is_file() and base["artifact_sha256"]

    for n in profile.n_grid:
        result = pipeline.stage1(n, job=True)
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {"adapter_files_intact": True, "test_nll_is_finite": True}
        logs = [entry.user_message for entry in pipeline.instance.all_logs(result.run_id)]
        assert any("step 2/2" in m and "tokens/s" in m and "ETA" in m for m in logs), "progress in the run log"
        assert any("CPU precision" in m and "cpu_precision=auto" in m for m in logs), "precision and reason logged"

    runs = store.query("SELECT * FROM train.stage1_runs ORDER BY n")
    assert set(runs.columns) >= RUN_COLUMNS
    assert runs["n"].to_list() == profile.n_grid and set(runs["model"]) == {profile.stage1_model}
    assert set(runs["stage"]) == {1} and set(runs["r"]) == {16} and set(runs["dropout"]) == {0.0}
    assert all((Path(p) / "adapter_config.json").is_file() for p in runs["artifact_path"])
    assert all(reason.startswith("cpu_precision=auto") for reason in runs["precision_reason"])
    curve_rows = store.query(
        "SELECT n, count(*) AS steps FROM train.loss_curve WHERE stage = 1 GROUP BY n ORDER BY n"
    )
    assert curve_rows["steps"].to_list() == [2, 2, 2]
    nll = store.query("SELECT * FROM eval.stage1_test_nll ORDER BY n")
    assert nll["questions"].to_list() == [profile.eval_questions] * 3
    assert all(0 < value < 20 for value in nll["nll"]) and (nll["answer_tokens"] > 0).all()
    # The base is scored once per model and question set; the other n read it back.
    assert nll["base_nll"].n_unique() == 1
    assert len(list((settings.artifact_dir() / "base_nll" / "tiny-llama").glob("*.json"))) == 1

    assert training.chosen_n(store) is None
    assert pipeline.materialize(["stage1_scale_curve", "optimal_scale"]).success
    curve = store.query("SELECT * FROM eval.scale_curve ORDER BY n")
    assert curve["n"].to_list() == profile.n_grid and curve["is_optimal"].sum() == 1
    assert (
        set(curve["status"]) <= set(scaling.STATUSES)
        and curve["paired_questions"].to_list() == [profile.eval_questions] * 3
    )
    assert curve["delta_nll"][0] is None and curve["delta_nll"][1] == pytest.approx(
        curve["test_nll"][1] - curve["test_nll"][0]
    )
    best = training.chosen_n(store)
    assert best == curve.filter(pl.col("test_nll") == curve["test_nll"].min())["n"][0]
    assert curve.filter(pl.col("n") == best)["nll_above_optimum"][0] == 0.0
    assert store.query("SELECT * FROM eval.optimal_scale").to_dicts() == [
        {"model": profile.stage1_model, "n": best}
    ]

    # Stage 2 at n*: the stage-2 LoRA shape, beside (not instead of) the stage-1 adapters.
    first = pipeline.automation()
    assert pipeline.stage2("tiny-llama").success
    stage2 = store.query("SELECT model, n, stage, r, alpha, dropout FROM train.stage2_runs").to_dicts()
    assert stage2 == [{"model": "tiny-llama", "n": best, "stage": 2, "r": 32, "alpha": 16, "dropout": 0.05}]
    assert store.query("SELECT count(*) AS c FROM train.stage1_runs")["c"][0] == 3
    assert store.query("SELECT count(*) AS c FROM eval.stage2_test_nll")["c"][0] == 1
    settled = pipeline.automation(first.cursor)
    assert "tiny-llama" not in settled.get_requested_partitions(dg.AssetKey("stage2_lora_adapter"))

    # An unchanged n* from a re-run stage 1 leaves stage 2 alone; a new n* makes Dagster request it.
    assert pipeline.materialize(["optimal_scale"]).success
    same = pipeline.automation(settled.cursor)
    assert "tiny-llama" not in same.get_requested_partitions(dg.AssetKey("stage2_lora_adapter"))
    other = next(n for n in profile.n_grid if n != best)
    moved = curve.with_columns((pl.col("n") == other).alias("is_optimal"))
    store.write_slice(SCALE_CURVE_TABLE, moved, {})
    assert pipeline.materialize(["optimal_scale"]).success
    assert training.chosen_n(store) == other
    changed = pipeline.automation(same.cursor)
    assert "tiny-llama" in changed.get_requested_partitions(dg.AssetKey("stage2_lora_adapter"))
    assert "upstream data version changed" in _condition_labels_true(changed, "stage2_lora_adapter", "tiny-llama")

    lineage = store.query(
        "SELECT upstream_asset_key FROM lineage.inputs WHERE asset_key = 'stage2_lora_adapter' "
        "GROUP BY ALL ORDER BY 1"
    )
    assert lineage["upstream_asset_key"].to_list() == ["base_model", "optimal_scale", "training_subset"]


def test_failed_partition_keeps_the_registered_adapter(
    pipeline: Pipeline, store: DuckDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import trl

    pipeline.prepare()
    assert pipeline.stage1(60).success
    before = store.query("SELECT * FROM train.stage1_runs").row(0, named=True)
    adapters = Path(before["artifact_path"]).parent
    folders_before = sorted(p.name for p in adapters.iterdir())

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(trl.SFTTrainer, "training_step", exhausted)
    failed = pipeline.stage1(60, raise_on_error=False)
    assert not failed.success
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    text = str(failure.event_specific_data.error)
    assert "partition stage1 tiny-llama n=60: out of memory" in text and "halve per_device_batch_size" in text

    after = store.query("SELECT * FROM train.stage1_runs").row(0, named=True)
    assert (
        after["artifact_path"] == before["artifact_path"]
        and after["artifact_sha256"] == before["artifact_sha256"]
    )
    assert sorted(p.name for p in adapters.iterdir()) == folders_before, "no new adapter folder, no temp left"
    assert (
        store.query(
            "SELECT count(*) AS c FROM lineage.materializations WHERE asset_key='stage1_lora_adapter'"
        )["c"][0]
        == 1
    )


def test_unknown_model_key_in_the_profile_fails_with_the_catalogue(
    store: DuckDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JPSLM_MODELS", '["tiny-llama", "mystery-7b"]')
    try:
        importlib.reload(training)
        pipeline = Pipeline(store)
        result = pipeline.materialize(["model_architecture"], "mystery-7b", raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert "model 'mystery-7b' is not in the catalogue" in str(failure.event_specific_data.error)
    finally:
        monkeypatch.delenv("JPSLM_MODELS")
        importlib.reload(training)


def test_an_optimal_n_outside_the_grid_is_refused_before_stage2(pipeline: Pipeline, store: DuckDBStore) -> None:
    profile = current_profile()
    stale = pl.DataFrame(
        {"model": [profile.stage1_model], "n": [999], "test_nll": [1.0], "is_optimal": [True], "status": ["optimal"]}
    )
    store.write_slice(SCALE_CURVE_TABLE, stale, {})
    assert pipeline.materialize(["rebalanced_pool", "test_set"]).success
    result = pipeline.materialize(["optimal_scale"], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "optimal n=999 is not in the profile's n_grid" in str(failure.event_specific_data.error)
    assert not store.table_exists(OPTIMAL_SCALE_TABLE), "nothing half-written"
