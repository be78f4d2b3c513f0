"""The README's demo, end to end: a first demo killed with ``kill -9`` during training, then a demo that
recovers by itself and materializes every stage of the paper, an unchanged re-run that launches nothing, then the UI (webserver + daemon) on the finished demo's DAGSTER_HOME, which requests nothing;
when n* changes, Dagster's automation evaluator requests stage 2 with its reason.

Slow (several minutes on 2 cores): it trains, exports, answers and judges with the real demo models.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from jpslm_assets.cli import prepare_instance
from jpslm_assets.export.tables import GGUF_FORMATS
from jpslm_assets.judging import controls as controls_lib
from jpslm_assets.resources.cpu import choose_cpu_precision, cpu_bf16_flags
from jpslm_assets.settings import load_profile
from jpslm_assets.training.scaling import INDISTINGUISHABLE, STATUSES
from jpslm_assets_tests.dagster_processes import start_dagster_ui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[1]
TABLE_SENSOR, TRAINING_SENSOR = "jpslm_table_automation", "jpslm_training_automation"

LINEAGE_TO_GRAPH = """
WITH RECURSIVE walk(materialization_id, asset_key, partition_key, depth) AS (
    SELECT m.materialization_id, m.asset_key, m.partition_key, 0
    FROM eval.judge_scores s
    JOIN lineage.materializations m
      ON m.asset_key = 'judge_scores_' || s.format AND m.partition_key = s.adapter
    WHERE s.adapter = ? AND s.format = 'q4_k_m'
    QUALIFY row_number() OVER (ORDER BY m.materialized_at DESC) = 1
    UNION
    SELECT i.upstream_materialization_id, i.upstream_asset_key, i.upstream_partition_key, w.depth + 1
    FROM walk w JOIN lineage.inputs i ON i.materialization_id = w.materialization_id
    WHERE i.upstream_materialization_id IS NOT NULL
)
SELECT DISTINCT w.asset_key, m.data_version
FROM walk w JOIN lineage.materializations m USING (materialization_id)
"""


def _environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "JPSLM_DATA_DIR": str(data_dir), **extra}
    for name in ("DAGSTER_HOME", "JPSLM_PROFILE", "JPSLM_DUCKDB_PATH"):
        env.pop(name, None)
    return env


def _kill_demo_during_training(data_dir: Path) -> str:
    """Start ``jpslm demo``, ``kill -9`` its whole process group once stage-1 training holds the gpu slot.

    Returns the id of the run it leaves behind (STARTED, holding the slot: what a crash or OOM kill leaves).
    """
    demo = subprocess.Popen(
        [sys.executable, "-m", "jpslm_assets.cli", "demo"], cwd=ROOT, env=_environment(data_dir),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        home = data_dir / "dagster_home"
        _wait(lambda: (home / "dagster.yaml").exists(), 300, "the demo's DAGSTER_HOME")
        os.environ["DAGSTER_HOME"] = str(home)
        prepare_instance(home)  # as every jpslm command does: never create the storage beside the demo
        with dg.DagsterInstance.get() as instance:

            def training() -> list:
                if demo.poll() is not None:
                    raise AssertionError(f"the demo ended (rc {demo.returncode}) before stage-1 training started")
                claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
                return [slot for slot in claimed if slot.step_key == "stage1_lora_adapter"]

            _wait(training, 900, "stage-1 training to claim the gpu slot", poll=0.2)
            # Kill at once: on a fast CPU a demo partition trains in a few seconds, and the kill must land while
            # the step still holds the slot (loading the model alone takes longer than this poll).
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
            (record,) = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            slots = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
            assert [slot.run_id for slot in slots] == [record.dagster_run.run_id]
            return record.dagster_run.run_id
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()


def _demo(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jpslm_assets.cli", "demo"],
        cwd=ROOT, env=_environment(data_dir), capture_output=True, text=True, timeout=3000,
    )  # fmt: skip


def _ticks(log: Path, sensor: str) -> int:
    """Evaluations of one automation sensor that the daemon finished, from its log."""
    if not log.exists():
        return 0
    return log.read_text("utf-8", errors="replace").count(f"Finished auto-materialization tick for {sensor} ")


def _wait(predicate, timeout: float, what: str, log: str = "", poll: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")


def _check_tables(data_dir: Path) -> None:
    profile = load_profile("demo")
    reference = profile.stage1_model
    with duckdb.connect(str(data_dir / "jpslm.duckdb"), read_only=True) as con:
        stage1 = con.sql("SELECT model, n, r, dropout, precision, precision_reason FROM train.stage1_runs").pl()
        assert sorted(stage1["n"].to_list()) == profile.n_grid and set(stage1["model"]) == {reference}
        assert set(stage1["r"]) == {profile.train.stage1.r} and set(stage1["dropout"]) == {0.0}
        (n_star,) = con.sql("SELECT n FROM eval.optimal_scale").fetchone()
        stage2 = con.sql("SELECT model, n, r, dropout, precision, precision_reason FROM train.stage2_runs").pl()
        assert sorted(stage2["model"].to_list()) == sorted(profile.models)
        assert set(stage2["n"]) == {n_star} and set(stage2["r"]) == {32} and set(stage2["dropout"]) == {0.05}
        # CPU precision follows this machine's CPU, with its reason recorded.
        expected, _ = choose_cpu_precision("auto", cpu_bf16_flags())
        label = "bf16-autocast" if expected == "bf16" else "fp32"
        both = con.sql("SELECT stage, count(*) FROM marts.training_runs GROUP BY stage ORDER BY stage").fetchall()
        assert both == [(1, len(profile.n_grid)), (2, len(profile.models))]
        runs = pl.concat([stage1, stage2])
        assert set(runs["precision"]) == {label}
        assert all(reason.startswith("cpu_precision=auto") for reason in runs["precision_reason"])
        # The reference model's stage-1 and stage-2 adapters at n* both exported and judged.
        merged = con.sql("SELECT adapter, stage, n, lora_r FROM serve.merged_models ORDER BY adapter").pl()
        assert {(row["adapter"], row["stage"]) for row in merged.iter_rows(named=True)} == {
            *((m, 2) for m in profile.models), (f"{reference}@stage1", 1)
        }
        assert set(merged["n"]) == {n_star}

        summary = con.sql("SELECT model, format, questions, ci_low, ci_high FROM marts.score_summary").fetchall()
        assert {(model, fmt) for model, fmt, *_ in summary} == {
            (m, f) for m in profile.models for f in GGUF_FORMATS
        }
        assert all(row[2] > 0 and row[3] is not None and row[4] is not None for row in summary)
        lesson4 = con.sql("SELECT * FROM marts.lora_rank_effect").pl()
        assert set(lesson4["model"]) == {reference} and set(lesson4["format"]) == set(GGUF_FORMATS)
        assert set(lesson4["stage1_r"]) == {16} and set(lesson4["stage2_r"]) == {32}
        assert (lesson4["pairs"] == profile.eval_questions).all() and lesson4["p_value"].is_not_null().all()
        categories = con.sql("SELECT count(DISTINCT category) FROM eval.answers").fetchone()
        assert categories == (8,), "one evaluation question per category"
        scale = con.sql("SELECT * FROM marts.scale_curve ORDER BY n").pl()
        assert scale["delta_nll"][0] is None and scale["nll_above_optimum"].min() == 0.0
        # Each n's distance to n* carries a paired interval over the test questions, and the status follows it.
        assert scale["status"].is_in(list(STATUSES)).all() and scale["status"].to_list().count("optimal") == 1
        others = scale.filter(pl.col("n") != n_star)
        assert others["diff_ci_low"].is_not_null().all() and (others["paired_questions"] > 1).all()
        for row in others.iter_rows(named=True):
            excludes_zero = row["diff_ci_low"] > 0 or row["diff_ci_high"] < 0
            assert (row["status"] != INDISTINGUISHABLE) == excludes_zero, row
        # The model-free reference metric beside the judge, and the references that repeat training text.
        chrf = con.sql("SELECT * FROM marts.chrf_summary").pl()
        assert {(r["model"], r["format"]) for r in chrf.iter_rows(named=True)} >= {
            (m, f) for m in profile.models for f in GGUF_FORMATS
        }
        assert (chrf["answers"] == profile.eval_questions).all() and chrf["mean_chrf"].is_between(0, 100).all()
        overlap = con.sql("SELECT * FROM qa.reference_overlap WHERE against = 'rebalanced_pool'").pl()
        assert overlap.height == 200 and overlap["repeats_training"].any()

        # Every judge has a validity verdict, and it is what its controls measured.
        judges = {row[0] for row in con.sql("SELECT DISTINCT judge FROM eval.judge_scores").fetchall()}
        validity = con.sql("SELECT * FROM marts.judge_validity ORDER BY judge").pl()
        assert set(validity["judge"]) == judges and validity.height == len(judges)
        controls = con.sql("SELECT judge, question_id, control, score FROM eval.judge_controls").pl()
        assert controls.height == 2 * profile.eval_questions * len(judges)
        assert validity["verdict"].to_list() == controls_lib.validity(controls)["verdict"].to_list()
        summary_verdicts = con.sql("SELECT DISTINCT judge, judge_verdict FROM marts.score_summary").fetchall()
        assert dict(summary_verdicts) == dict(zip(validity["judge"], validity["verdict"], strict=True))
        (report_path,) = con.sql(
            "SELECT artifact_path FROM reports.report_history ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
        body = Path(report_path).read_text("utf-8").split("<body>\n", 1)[1]
        verdict = validity["verdict"][0]
        expected_start = "警告 (warning): no signal" if verdict == "no signal" else "判定者の妥当性 (judge validity)"
        assert body.startswith(f'<p class="lead"><strong>{expected_start}'), body[:300]

        reached = dict(con.execute(LINEAGE_TO_GRAPH, [reference]).fetchall())
        graph_version = con.sql(
            "SELECT data_version FROM lineage.materializations WHERE asset_key = 'kg_relations' "
            "ORDER BY materialized_at DESC LIMIT 1"
        ).fetchone()
        assert graph_version is not None and reached.get("kg_relations") == graph_version[0]
        assert {"stage2_lora_adapter", "optimal_scale", "training_subset", "qa_pool", "gguf_q4_k_m"} <= set(reached)


def test_demo_runs_every_stage_then_the_ui_starts_nothing_until_n_star_changes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    previous = {name: os.environ.get(name) for name in ("DAGSTER_HOME", "JPSLM_DATA_DIR")}
    try:
        crashed_run = _kill_demo_during_training(data_dir)
    finally:
        _restore(previous)
    first = _demo(data_dir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert f"run {crashed_run} (__ASSET_JOB) was STARTED" in first.stdout and "marked it failed" in first.stdout
    _check_tables(data_dir)

    second = _demo(data_dir)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "materializing" not in second.stdout, second.stdout
    assert "(0 runs launched)" in second.stdout

    previous = {name: os.environ.get(name) for name in ("DAGSTER_HOME", "JPSLM_DATA_DIR")}
    try:
        _check_ui_automation(data_dir, tmp_path)
    finally:
        _restore(previous)


def _restore(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _check_ui_automation(data_dir: Path, tmp_path: Path) -> None:
    """The UI on the demo's home, training automation switched on: two ticks of each sensor and no run;
    then n* changes and Dagster's automation evaluator requests stage 2, for the reason it gives."""
    home = data_dir / "dagster_home"
    env = _environment(data_dir, DAGSTER_HOME=str(home), JPSLM_AUTOMATION__TRAINING="true")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["JPSLM_DATA_DIR"] = str(data_dir)  # the definitions below write to the demo's store
    instance = dg.DagsterInstance.get()
    runs_before = len(instance.get_runs())
    log = tmp_path / "ui.log"
    log.unlink(missing_ok=True)  # ticks are counted from this start only
    with start_dagster_ui(target=["-m", "jpslm_assets.definitions"], env=env, log_path=log, cwd=ROOT) as ui:
        _wait(
            lambda: min(_ticks(log, TABLE_SENSOR), _ticks(log, TRAINING_SENSOR)) >= 2,
            240, "two ticks of both automation sensors", ui.log_tail(),
        )  # fmt: skip
        assert len(instance.get_runs()) == runs_before, "the UI started a run after the demo"

    # Stage 1 now prefers another n: n* changes, and Dagster's evaluator (the one the sensors run) requests
    # stage 2 for every model, saying why.
    from jpslm_assets import automation
    from jpslm_assets.definitions import build_definitions

    defs = build_definitions()

    training = dg.AssetSelection.all() - automation.table_selection()
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=training)
    assert before.total_requested == 0, "the finished demo leaves nothing for automation to do"
    with duckdb.connect(str(data_dir / "jpslm.duckdb")) as con:
        (n_star,) = con.sql("SELECT n FROM eval.optimal_scale").fetchone()
        con.execute(
            "UPDATE eval.scale_curve SET is_optimal = (n = (SELECT min(n) FROM eval.scale_curve WHERE n <> ?))",
            [n_star],
        )
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("optimal_scale")]).success
    after = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=training, cursor=before.cursor
    )
    stage2 = dg.AssetKey("stage2_lora_adapter")
    assert after.get_requested_partitions(stage2) == set(load_profile("demo").models)
    labels: set[str] = set()
    for result in after.results:
        if result.key == stage2:
            stack = [result]
            while stack:
                node = stack.pop()
                if node.true_subset.size and node.condition.get_label():
                    labels.add(node.condition.get_label())
                stack.extend(node.child_results)
    assert "upstream data version changed" in labels, labels
