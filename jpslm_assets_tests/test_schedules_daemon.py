"""The re-evaluation schedule under a real ``dagster-daemon``: a tick fires, the queued run succeeds.

The code location is the toy one from ``report_samples`` (answers -> judge -> mart assets on the contract
tables, the real report assets, the real schedule builder); the cron comes from the profile override
``JPSLM_SCHEDULE__REEVALUATION_CRON`` set to every minute, so the first tick comes within 60 s.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from jpslm_assets import settings
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.dagster_processes import start_daemon
from jpslm_assets_tests.report_samples import deployments_frame

ROOT = Path(__file__).resolve().parents[1]
TARGET = ["-m", "jpslm_assets_tests.report_samples", "-a", "location", "-d", str(ROOT)]


@pytest.mark.integration
def test_daemon_ticks_the_schedule_and_the_run_succeeds(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    settings.dagster_home()  # the project's instance config: queued runs, telemetry off
    duckdb_file = data_dir / "jpslm.duckdb"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "JPSLM_DATA_DIR": str(data_dir),
        "JPSLM_DUCKDB_PATH": str(duckdb_file),
        "JPSLM_SCHEDULE__REEVALUATION_CRON": "* * * * *",
        "PYTHONPATH": str(ROOT),
    }
    store = DuckDBStore(path=str(duckdb_file), lock_timeout_s=30)
    store.write_slice("serve.deployments", deployments_frame([("tiny-llama", 40, "f16", "ok")]), {})

    started = subprocess.run(
        ["dagster", "schedule", "start", "reevaluation_schedule", *TARGET],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr

    with start_daemon(target=TARGET, env=env, log_path=tmp_path / "daemon.log", cwd=ROOT) as daemon:
        instance = dg.DagsterInstance.get()  # DAGSTER_HOME points at the daemon's instance
        deadline = time.monotonic() + 240
        run = None
        while time.monotonic() < deadline:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"jpslm/trigger": "reevaluation_schedule"}))
            if runs and runs[0].is_finished:
                run = runs[0]
                break
            assert daemon.alive(), daemon.log_tail()
            time.sleep(2)
        assert run is not None, f"no finished scheduled run within 240 s; daemon log:\n{daemon.log_tail()}"
        assert run.status == dg.DagsterRunStatus.SUCCESS, daemon.log_tail()
        assert run.tags["dagster/partition"] == "tiny-llama"
        assert run.tags["dagster/schedule_name"] == "reevaluation_schedule"
        instance.dispose()

    scores = store.query("SELECT model, n, format, count(*) AS rows FROM eval.judge_scores GROUP BY ALL")
    assert scores.rows() == [("tiny-llama", 40, "f16", 6)]
    history = store.query("SELECT run_id, artifact_path FROM reports.report_history")
    assert history["run_id"].to_list() == [run.run_id]
    assert Path(history["artifact_path"][0]).is_file()
