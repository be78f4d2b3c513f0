"""A run whose process dies never holds a pool slot for the next one.

Each case first reproduces the defect on a real Dagster instance (a run left STARTED holding the ``gpu``
slot after ``kill -9``), then checks that the recovery marks it failed, frees the slot and names the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from jpslm_assets import run_recovery

pytestmark = pytest.mark.timeout(300)

TOY = textwrap.dedent(
    """
    import time
    import dagster as dg

    @dg.asset(pool="gpu")
    def slow_training() -> int:
        time.sleep(300)
        return 1

    defs = dg.Definitions(assets=[slow_training])
    """
)
IN_PROCESS = textwrap.dedent(
    """
    import sys
    import dagster as dg
    sys.path.insert(0, sys.argv[1])
    from toy import slow_training
    dg.materialize([slow_training], instance=dg.DagsterInstance.get())
    """
)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n", encoding="utf-8"
    )
    (tmp_path / "toy.py").write_text(TOY, encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _instance(home: Path) -> dg.DagsterInstance:
    assert os.environ["DAGSTER_HOME"] == str(home)
    return dg.DagsterInstance.get()


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _claimed(instance: dg.DagsterInstance) -> list:
    return list(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots)


def _pending(instance: dg.DagsterInstance) -> list:
    return list(instance.event_log_storage.get_concurrency_info("gpu").pending_steps)


def _start_in_process(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", IN_PROCESS, str(tmp_path)], env=os.environ.copy(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for victim in [*children]:
        victim.kill()
    process.kill()
    process.wait()


def test_kill_9_during_a_pool_step_is_reaped_and_the_slot_freed(home: Path, tmp_path: Path) -> None:
    instance = _instance(home)
    worker = _start_in_process(tmp_path)
    try:
        _wait_for(lambda: _claimed(instance), "the gpu slot to be claimed")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        _kill_tree(worker)

    # The defect: the dead run is STARTED and keeps the only gpu slot.
    (record,) = instance.get_run_records()
    assert record.dagster_run.status == dg.DagsterRunStatus.STARTED
    (holder,) = run_recovery.pool_holders(instance, {"gpu"})
    assert holder.run_id == record.dagster_run.run_id and holder.step_key == "slow_training"
    assert holder.since is not None and "since" in holder.describe()

    lines: list[str] = []
    (reaped,) = run_recovery.reap_dead_runs(instance, lines.append)
    assert reaped.run_id == record.dagster_run.run_id and reaped.pids == (worker.pid,)
    assert reaped.freed_slots == 1
    assert lines == [reaped.describe()] and record.dagster_run.run_id in lines[0] and str(worker.pid) in lines[0]
    assert instance.get_run_by_id(record.dagster_run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert _claimed(instance) == [] and run_recovery.pool_holders(instance, {"gpu"}) == []
    failure = [e for e in instance.all_logs(record.dagster_run.run_id) if e.is_dagster_event and e.dagster_event.is_run_failure]
    assert failure and "are gone" in failure[0].dagster_event.message
    # Reaping again finds nothing.
    assert run_recovery.reap_dead_runs(instance, lines.append) == [] and len(lines) == 1


WAIT_LIKE_DEMO = textwrap.dedent(
    """
    import dagster as dg
    from jpslm_assets import run_recovery
    run_recovery.wait_for_pools(dg.DagsterInstance.get(), {"gpu"}, poll_s=0.2)
    """
)


def _default_signals() -> None:
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_DFL)


def test_a_run_blocked_on_the_pool_ignores_sigterm_so_the_demo_waits_outside_any_run(home: Path, tmp_path: Path) -> None:
    """Dagster's in-process wait for a pool slot swallows SIGINT and SIGTERM; ``jpslm demo`` waits before
    creating its run, where SIGTERM ends the process and leaves no run behind. A blocked run killed for good
    is reaped, and its place in the pool's queue with it."""
    instance = _instance(home)
    holder, blocked, demo_wait = _start_in_process(tmp_path), None, None
    try:
        _wait_for(lambda: _claimed(instance), "the gpu slot to be claimed")
        blocked = _start_in_process(tmp_path)
        _wait_for(lambda: len(_pending(instance)) == 2, "the second run to queue for the pool")
        blocked.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            blocked.wait(timeout=5)  # the defect: still alive, its run STARTED

        # As from a shell: signal dispositions set to "ignore" in this test process (in-process Dagster runs
        # map SIGTERM to whatever SIGINT does) would otherwise be inherited through exec.
        demo_wait = subprocess.Popen(
            [sys.executable, "-c", WAIT_LIKE_DEMO], env=os.environ.copy(), preexec_fn=_default_signals
        )
        time.sleep(3)
        assert demo_wait.poll() is None, "waits while the slot is held"
        demo_wait.send_signal(signal.SIGTERM)
        assert demo_wait.wait(timeout=30) == -signal.SIGTERM, "ended by the signal itself: no handler swallows it"
        assert len(instance.get_run_records()) == 2, "the demo's wait created no run"

        blocked.kill()
        blocked.wait()
        reaped = run_recovery.reap_dead_runs(instance, lambda line: None)
        assert [r.pids for r in reaped] == [(blocked.pid,)] and reaped[0].freed_slots == 0
        # The live holder is left alone with its slot; the blocked run's place in the queue is gone.
        assert [slot.run_id for slot in _claimed(instance)] != [reaped[0].run_id]
        assert [step.run_id for step in _pending(instance)] == [slot.run_id for slot in _claimed(instance)]
    finally:
        for process in (holder, blocked, demo_wait):
            if process is not None:
                _kill_tree(process)


def test_an_orphaned_step_worker_keeps_the_slot_until_it_exits_and_the_wait_says_so(home: Path, tmp_path: Path) -> None:
    """``kill -9`` of ``dagster asset materialize`` leaves its step subprocess running: that run still works."""
    instance = _instance(home)
    cli = subprocess.Popen(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(tmp_path / "toy.py"), "--select", "slow_training"],
        env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    step_worker = None
    try:
        _wait_for(lambda: _claimed(instance), "the gpu slot to be claimed")
        run_id = _claimed(instance)[0].run_id
        _wait_for(lambda: len(run_recovery.run_processes(instance, run_id)) == 2, "the step subprocess's events")
        (step_pid,) = run_recovery.run_processes(instance, run_id) - {cli.pid}
        step_worker = psutil.Process(step_pid)
        cli.kill()
        cli.wait()
        assert step_worker.is_running()

        lines: list[str] = []
        assert run_recovery.reap_dead_runs(instance, lines.append) == [] and lines == []

        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == 3:
                step_worker.kill()
                step_worker.wait()

        waited = run_recovery.wait_for_pools(instance, {"gpu"}, lines.append, poll_s=5, report_every_s=10, sleep=sleep)
        assert waited == 15.0
        waiting = [line for line in lines if line.startswith("waiting for a slot")]
        assert len(waiting) == 2 and all(f"run {run_id} (step slow_training) since " in line for line in waiting)
        assert any(run_id in line and "marked it failed" in line for line in lines)
        assert lines[-1] == "pool(s) gpu free after waiting 15 s"
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        _kill_tree(cli)
        if step_worker is not None and step_worker.is_running():
            step_worker.kill()


def test_a_reused_process_id_does_not_keep_a_dead_run_alive() -> None:
    me = psutil.Process()
    assert run_recovery.process_alive(me.pid, run_started=None)
    assert run_recovery.process_alive(me.pid, run_started=me.create_time() + 60)
    # This process started long after a run that began an hour earlier: not that run's worker.
    assert not run_recovery.process_alive(me.pid, run_started=me.create_time() - 3600)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert not run_recovery.process_alive(finished.pid, run_started=None)


def test_the_sensor_reaps_and_can_be_switched_off(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = _instance(home)
    worker = _start_in_process(tmp_path)
    try:
        _wait_for(lambda: _claimed(instance), "the gpu slot to be claimed")
        worker.kill()
        worker.wait()
    finally:
        _kill_tree(worker)
    sensor = run_recovery.reaper_sensor()
    monkeypatch.setenv(run_recovery.REAP_ENV, "false")
    result = sensor(dg.build_sensor_context(instance=instance))
    assert result.skip_message == "switched off (JPSLM_REAP_DEAD_RUNS=false)" and _claimed(instance)
    monkeypatch.delenv(run_recovery.REAP_ENV)
    result = sensor(dg.build_sensor_context(instance=instance))
    (run,) = instance.get_run_records()
    assert run.dagster_run.run_id in result.skip_message and "freed 1 pool slot" in result.skip_message
    assert _claimed(instance) == []


def test_slots_of_a_run_that_ended_are_freed(home: Path, tmp_path: Path) -> None:
    instance = _instance(home)
    worker = _start_in_process(tmp_path)
    try:
        _wait_for(lambda: _claimed(instance), "the gpu slot to be claimed")
        worker.kill()
        worker.wait()
    finally:
        _kill_tree(worker)
    (record,) = instance.get_run_records()
    instance.report_run_canceled(record.dagster_run)  # ended, e.g. by hand in the UI, slot still claimed
    assert _claimed(instance)
    lines: list[str] = []
    assert run_recovery.reap_dead_runs(instance, lines.append) == []
    assert _claimed(instance) == [] and lines == [f"run {record.dagster_run.run_id} (__ephemeral_asset_job__) ended CANCELED: freed 1 pool slot(s)"]
