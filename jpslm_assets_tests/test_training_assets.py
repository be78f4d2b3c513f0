"""The training stage as Dagster assets, jobs and sensors, on tiny-llama with stand-in dataset assets."""

import importlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from jpslm_assets import settings, training
from jpslm_assets.domain.scaling import ScaleCurveError
from jpslm_assets.partitions import model_n_key
from jpslm_assets.settings import current_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.test_training_support import TINY_RUN, definitions, eval_questions_frame, qa_pairs

RUN_COLUMNS = {
    "model", "n", "stage", "backend", "r", "alpha", "dropout", "steps", "train_loss_final", "train_loss_avg",
    "minutes", "tokens_per_s", "base_model_ref", "artifact_path", "artifact_bytes", "artifact_sha256",
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

    def train(
        self, model: str, n: int, job: str | None = None, raise_on_error: bool = True, **config: Any
    ) -> dg.ExecuteInProcessResult:
        run_config = {"ops": {"lora_adapter": {"config": {**TINY_RUN, **config}}}}
        if job is None:
            return self.materialize(
                ["lora_adapter", "test_nll"],
                model_n_key(model, n),
                run_config=run_config,
                raise_on_error=raise_on_error,
            )
        return self.defs.resolve_job_def(job).execute_in_process(
            partition_key=model_n_key(model, n),
            run_config=run_config,
            instance=self.instance,
            resources=self.defs.resources,
        )


@pytest.fixture
def pipeline(store: DuckDBStore) -> Pipeline:
    return Pipeline(store)


def test_stage1_then_stage2_end_to_end(pipeline: Pipeline, store: DuckDBStore) -> None:
    profile = current_profile()
    pipeline.prepare()

    architecture = store.query("SELECT * FROM train.model_architecture").row(0, named=True)
    assert (architecture["heads"], architecture["kv_heads"], architecture["attention_kind"]) == (8, 2, "GQA")
    base = store.query("SELECT * FROM train.base_models").row(0, named=True)
    assert Path(base["base_model_ref"], "tokenizer.model").is_file() and base["artifact_sha256"]

    for n in profile.n_grid:
        result = pipeline.train("tiny-llama", n, job="stage1_scale_search")
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {"lora_adapter_files_intact": True, "test_nll_is_finite": True}
        logs = [entry.user_message for entry in pipeline.instance.all_logs(result.run_id)]
        assert any("step 2/2" in m and "tokens/s" in m and "ETA" in m for m in logs), (
            "progress in the run log"
        )

    runs = store.query("SELECT * FROM train.runs ORDER BY n")
    assert set(runs.columns) >= RUN_COLUMNS
    assert runs["n"].to_list() == profile.n_grid and set(runs["stage"]) == {1} and set(runs["r"]) == {16}
    assert all((Path(p) / "adapter_config.json").is_file() for p in runs["artifact_path"])
    curve_rows = store.query("SELECT n, count(*) AS steps FROM train.loss_curve GROUP BY n ORDER BY n")
    assert curve_rows["steps"].to_list() == [2, 2, 2]
    nll = store.query("SELECT * FROM eval.test_nll ORDER BY n")
    assert nll["questions"].to_list() == [profile.eval_questions] * 3
    assert all(0 < value < 20 for value in nll["nll"]) and (nll["answer_tokens"] > 0).all()
    # The base is scored once per model and question set; the other n read it back.
    assert nll["base_nll"].n_unique() == 1
    assert len(list((settings.artifact_dir() / "base_nll" / "tiny-llama").glob("*.json"))) == 1
    assert [r["precision"] for r in runs.iter_rows(named=True)] == ["bf16-autocast"] * 3  # the demo profile's

    stage1 = training.stage1_scale_curve_sensor(dg.build_sensor_context(instance=pipeline.instance))
    assert [r.partition_key for r in stage1.run_requests] == ["tiny-llama"]
    assert training.chosen_n(store) is None
    assert (
        pipeline.defs.resolve_job_def("stage1_select_n")
        .execute_in_process(
            partition_key="tiny-llama", instance=pipeline.instance, resources=pipeline.defs.resources
        )
        .success
    )
    assert training.stage1_scale_requests(pipeline.instance, profile) == []

    curve = store.query("SELECT * FROM eval.scale_curve ORDER BY n")
    assert curve["n"].to_list() == profile.n_grid and curve["is_optimal"].sum() == 1
    assert set(curve["status"]) <= {"underfit", "improving", "optimal", "overfitting"}
    best = training.chosen_n(store)
    assert best == curve.filter(pl.col("test_nll") == curve["test_nll"].min())["n"][0]
    assert curve.filter(pl.col("n") == best)["delta_nll"][0] == 0.0

    sensor = training.stage2_sensor(
        dg.build_sensor_context(instance=pipeline.instance, resources={"store": store})
    )
    requests, cursor = sensor.run_requests, sensor.cursor
    assert [r.partition_key for r in requests] == [model_n_key(m, best) for m in profile.models]
    assert all(r.tags[training.STAGE_TAG] == "2" for r in requests)
    assert json.loads(cursor)["n"] == best
    again, _, reason = training.stage2_requests(pipeline.instance, store, profile, cursor)
    assert again == [] and "no new optimal_scale" in reason

    assert pipeline.train("tiny-llama", best, job="stage2_model_comparison").success
    stage2 = store.query("SELECT stage, r, alpha, dropout FROM train.runs WHERE n = ?", [best]).row(
        0, named=True
    )
    assert stage2 == {"stage": 2, "r": 32, "alpha": 16, "dropout": 0.05}
    assert training.stage1_scale_requests(pipeline.instance, profile) == [], (
        "stage-2 runs are not a new stage 1"
    )

    lineage = store.query(
        "SELECT upstream_asset_key FROM lineage.inputs WHERE asset_key = 'lora_adapter' GROUP BY ALL ORDER BY 1"
    )
    assert lineage["upstream_asset_key"].to_list() == ["base_model", "training_subset"]


def test_failed_partition_keeps_the_registered_adapter(
    pipeline: Pipeline, store: DuckDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import trl

    pipeline.prepare()
    assert pipeline.train("tiny-llama", 60).success
    before = store.query("SELECT * FROM train.runs").row(0, named=True)
    adapters = Path(before["artifact_path"]).parent
    folders_before = sorted(p.name for p in adapters.iterdir())

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(trl.SFTTrainer, "training_step", exhausted)
    failed = pipeline.train("tiny-llama", 60, raise_on_error=False)
    assert not failed.success
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    text = str(failure.event_specific_data.error)
    assert "partition tiny-llama|60: out of memory" in text and "halve per_device_batch_size" in text

    after = store.query("SELECT * FROM train.runs").row(0, named=True)
    assert (
        after["artifact_path"] == before["artifact_path"]
        and after["artifact_sha256"] == before["artifact_sha256"]
    )
    assert sorted(p.name for p in adapters.iterdir()) == folders_before, "no new adapter folder, no temp left"
    assert (
        store.query("SELECT count(*) AS c FROM lineage.materializations WHERE asset_key='lora_adapter'")["c"][
            0
        ]
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


def test_chosen_n_outside_the_grid_stops_stage2(pipeline: Pipeline, store: DuckDBStore) -> None:
    profile = current_profile()
    reference = profile.models[0]
    stale = pl.DataFrame(
        {"model": [reference], "n": [999], "test_nll": [1.0], "is_optimal": [True], "status": ["optimal"]}
    )
    store.write_slice(training.SCALE_CURVE_TABLE, stale, {"model": reference})
    pipeline.instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key="optimal_scale", partition=reference)
    )
    with pytest.raises(ScaleCurveError, match=r"chosen n of tiny-llama=999 is not in the profile's n_grid"):
        training.stage2_requests(pipeline.instance, store, profile, None)
