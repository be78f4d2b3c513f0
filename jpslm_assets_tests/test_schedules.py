"""The re-evaluation schedule: which deployments it picks, its skip reasons, and a run it requests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from jpslm_assets import settings
from jpslm_assets.reports import assets as reports
from jpslm_assets.reports import assets_reevaluation as reevaluation
from jpslm_assets.store import DuckDBStore, StoreError
from jpslm_assets_tests.report_samples import deployments_frame, reevaluation_location

TICK = datetime(2026, 3, 2, 3, 0, tzinfo=timezone.utc)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as test_instance:
        yield test_instance


def _tick(defs: dg.Definitions, store: DuckDBStore, instance: dg.DagsterInstance):
    schedule = defs.resolve_schedule_def("reevaluation_schedule")
    with dg.build_schedule_context(
        instance=instance,
        resources={"store": store},
        scheduled_execution_time=TICK,
        repository_def=defs.get_repository_def(),
    ) as context:
        return schedule.evaluate_tick(context)


def test_deployed_models_keeps_ok_rows_of_the_profile_and_explains_the_rest() -> None:
    deployments = deployments_frame(
        [
            ("tiny-llama", 120, "f16", "ok"),
            ("tiny-llama", 120, "q4_k_m", "ok"),
            ("tiny-qwen2", 120, "f16", "failed"),  # not ok: silently not a target
            ("swallow-8b", 4000, "f16", "ok"),  # another profile's model
            ("tiny-qwen2", 120, "nf4", "ok"),  # no evaluation asset for nf4 here
            ("smollm2-135m", 60, "q4_k_m", "ok"),  # its Q4 export failed
            ("smollm2-135m", 60, "f16", "ok"),
        ]
    )
    exports = pl.DataFrame(
        {"adapter": ["smollm2-135m", "smollm2-135m"], "n": [60, 60], "format": ["f16", "q4_k_m"],
         "status": ["ok", "failed"]}
    )  # fmt: skip
    adapters = ["tiny-llama", "tiny-qwen2", "smollm2-135m", "tiny-llama@stage1"]
    targets, notes = reevaluation.deployed_models(deployments, exports, adapters, ["f16", "q4_k_m"])
    assert targets == [
        reevaluation.DeployedModel("smollm2-135m", 60, ("f16",)),
        reevaluation.DeployedModel("tiny-llama", 120, ("f16", "q4_k_m")),
    ]
    assert notes == [
        "deployment smollm2-135m (n=60) q4_k_m: its GGUF export is not ok, skipped",
        "deployment swallow-8b (n=4000) f16: not a stage-3 adapter of the active profile "
        "(tiny-llama, tiny-qwen2, smollm2-135m, tiny-llama@stage1), skipped",
        "deployment tiny-qwen2 (n=120) nf4: no evaluation asset for format 'nf4', skipped",
    ]
    assert reevaluation.deployed_models(None, None, ["m"], ["f16"]) == ([], [])
    with pytest.raises(StoreError, match=r"serve.deployments lacks column\(s\) \['status'\]"):
        reevaluation.deployed_models(deployments.drop("status"), None, ["m"], ["f16"])


def test_targets_are_found_by_table_and_format(store: DuckDBStore) -> None:
    defs = reevaluation_location(str(store.file))
    targets = reevaluation.discover_reevaluation_targets(
        reports.asset_specs([defs]), reevaluation.load_reevaluation_config()
    )
    assert {fmt: [k.to_user_string() for k in keys] for fmt, keys in targets.per_format.items()} == {
        "f16": ["answers_f16", "judge_scores_f16"],
        "q4_k_m": ["answers_q4_k_m", "judge_scores_q4_k_m"],
    }
    downstream = {k.to_user_string() for k in targets.downstream}
    assert {"score_summary", "evaluation_report", "figure_model_comparison"} <= downstream
    selection = {k.to_user_string() for k in targets.selection_for(["f16"])}
    assert "answers_f16" in selection and "answers_q4_k_m" not in selection


def test_a_per_format_asset_without_a_fixed_format_is_named() -> None:
    from jpslm_assets.io_manager import table_metadata

    @dg.asset(metadata=table_metadata("eval.answers"))
    def answers_everything() -> None: ...

    with pytest.raises(ValueError, match="answers_everything writes eval.answers without a fixed format"):
        reevaluation.discover_reevaluation_targets(
            reports.asset_specs([dg.Definitions(assets=[answers_everything])]),
            reevaluation.load_reevaluation_config(),
        )


def test_schedule_skips_with_a_reason_when_nothing_was_deployed(
    store: DuckDBStore, instance: dg.DagsterInstance
) -> None:
    defs = reevaluation_location(str(store.file))
    result = _tick(defs, store, instance)
    assert not result.run_requests
    assert result.skip_message is not None
    assert "serve.deployments does not exist yet" in result.skip_message
    assert "Materialize the `deployment` assets" in result.skip_message

    store.write_slice(
        "serve.deployments",
        deployments_frame([("tiny-llama", 120, "f16", "failed"), ("swallow-8b", 4000, "f16", "ok")]),
        {},
    )
    result = _tick(defs, store, instance)
    assert not result.run_requests
    assert result.skip_message is not None
    assert "has no row with status 'ok' for this profile" in result.skip_message
    assert "swallow-8b (n=4000) f16: not a stage-3 adapter of the active profile" in result.skip_message
    assert instance.get_runs() == []  # a skip is not a failed run: no run at all


def test_schedule_requests_one_run_per_deployment_and_the_run_succeeds(
    store: DuckDBStore, instance: dg.DagsterInstance, data_dir: Path
) -> None:
    defs = reevaluation_location(str(store.file))
    store.write_slice(
        "serve.deployments",
        deployments_frame([("tiny-llama", 40, "f16", "ok"), ("tiny-llama", 40, "q4_k_m", "ok"),
                           ("smollm2-135m", 60, "f16", "ok")]),
        {},
    )  # fmt: skip
    result = _tick(defs, store, instance)
    requests = result.run_requests
    assert requests is not None and len(requests) == 2
    by_key = {str(r.partition_key): r for r in requests}
    assert set(by_key) == {"smollm2-135m", "tiny-llama"}
    small, tiny = by_key["smollm2-135m"], by_key["tiny-llama"]
    assert small.run_key == "reevaluation-20260302T0300-smollm2-135m-60"
    assert tiny.tags["jpslm/formats"] == "f16,q4_k_m"
    selected = {k.to_user_string() for k in tiny.asset_selection or []}
    assert {"answers_f16", "answers_q4_k_m", "judge_scores_f16", "judge_scores_q4_k_m", "score_summary",
            "evaluation_report"} <= selected  # fmt: skip
    assert "answers_q4_k_m" not in {k.to_user_string() for k in small.asset_selection or []}

    job = defs.resolve_job_def("reevaluation_job")
    for request in (small, tiny):
        run = job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            tags=request.tags,
            run_config=request.run_config,
        )
        assert run.success
        record = instance.get_run_by_id(run.run_id)
        assert record is not None and record.status == dg.DagsterRunStatus.SUCCESS
        assert record.tags["dagster/partition"] == str(request.partition_key)
    scores = store.query(
        "SELECT model, n, format, count(*) AS rows FROM eval.judge_scores GROUP BY ALL ORDER BY ALL"
    )
    assert scores.rows() == [("smollm2-135m", 60, "f16", 6), ("tiny-llama", 40, "f16", 6),
                             ("tiny-llama", 40, "q4_k_m", 6)]  # fmt: skip
    summary = store.query("SELECT model, format FROM marts.score_summary ORDER BY ALL")
    assert summary.height == 3
    reports_written = store.query("SELECT artifact_path FROM reports.report_history ORDER BY created_at")
    assert reports_written.height == 2 and all(Path(p).is_file() for p in reports_written["artifact_path"])
    # The newest report names where its tables came from (lineage written with the data).
    html = Path(reports_written["artifact_path"][-1]).read_text("utf-8")
    assert "eval.judge_scores ← judge_scores_f16" in html
    assert "marts.score_summary ← score_summary" in html


def test_cron_comes_from_the_profile_and_a_bad_one_names_the_setting(
    store: DuckDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    schedule = reevaluation_location(str(store.file)).resolve_schedule_def("reevaluation_schedule")
    assert schedule.cron_schedule == settings.load_profile().schedule.reevaluation_cron == "0 3 * * 1"
    monkeypatch.setenv("JPSLM_SCHEDULE__REEVALUATION_CRON", "30 4 * * *")
    schedule = reevaluation_location(str(store.file)).resolve_schedule_def("reevaluation_schedule")
    assert schedule.cron_schedule == "30 4 * * *"
    monkeypatch.setenv("JPSLM_SCHEDULE__REEVALUATION_CRON", "every monday")
    with pytest.raises(
        settings.SettingsError, match="'every monday' is not a valid cron.*JPSLM_SCHEDULE__REEVALUATION_CRON"
    ):
        reevaluation_location(str(store.file))


def test_the_code_location_has_the_schedule_over_the_real_evaluation_assets(
    store: DuckDBStore, instance: dg.DagsterInstance
) -> None:
    from jpslm_assets.definitions import defs

    schedule = defs.resolve_schedule_def("reevaluation_schedule")
    assert schedule.cron_schedule == settings.current_profile().schedule.reevaluation_cron
    job = defs.resolve_job_def("reevaluation_job")
    selected = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    assert {"answers_f16", "answers_q4_k_m", "judge_scores_f16", "judge_scores_q4_k_m"} <= selected
    groups = {
        defs.resolve_assets_def(key).group_names_by_key[key] for key in job.asset_layer.selected_asset_keys
    }
    assert {"marts", "reports"} <= groups
    # On a store where nothing was deployed, the real schedule skips with its reason.
    result = _tick(defs, store, instance)
    assert not result.run_requests and "no deployed model to re-evaluate" in (result.skip_message or "")
