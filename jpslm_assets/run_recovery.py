"""Runs whose process died, and the pool slots they hold.

A run killed with ``kill -9``, by the out-of-memory killer or by a power loss stays ``STARTED`` in Dagster's
run storage, and a step of the ``gpu`` pool it had started keeps its pool slot: every later ``gpu`` step,
from the UI or ``jpslm demo``, would wait for that slot forever. Dagster's run monitoring frees the slots
of runs that *ended* (``free_slots_after_run_end_seconds``, switched on in the generated ``dagster.yaml``) and
times out runs stuck starting, but it cannot tell that the worker of a locally launched run is gone.

Every Dagster event records the process that wrote it. A run is dead when it is not finished and none of
the processes that wrote its events is alive on this machine (a process id that now belongs to a process
started after the run does not count). ``reap_dead_runs`` marks each such run failed, naming the processes,
and frees its slots; it also frees slots still held by runs that ended. It runs when ``jpslm demo`` and
``jpslm ui`` start, while ``jpslm demo`` waits for a pool, and every minute from the ``jpslm_dead_run_reaper``
sensor while the UI's daemon runs.

The process check is local: with a run storage shared by several machines (PostgreSQL), a run whose
processes live on another machine looks dead here. ``JPSLM_REAP_DEAD_RUNS=false`` switches the check off
for such set-ups, where the executor's own monitoring (Celery, Kubernetes) is the authority.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg

REAP_ENV = "JPSLM_REAP_DEAD_RUNS"
REAPER_SENSOR = "jpslm_dead_run_reaper"
# Runs that a process is executing; QUEUED and NOT_STARTED runs hold no slot and belong to the daemon.
ACTIVE_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
# A process created this many seconds after the run started cannot be one of its workers (clock jitter).
_PID_REUSE_SLACK_S = 2.0


def reaping_enabled() -> bool:
    return os.environ.get(REAP_ENV, "true").strip().lower() not in {"0", "false", "no", "off"}


def run_processes(instance: dg.DagsterInstance, run_id: str) -> set[int]:
    """The ids of the processes that wrote the run's events (run worker, executor parent, step workers)."""
    pids: set[int] = set()
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.pid:
            pids.add(int(event.pid))
    return pids


def process_alive(pid: int, run_started: float | None) -> bool:
    """Whether ``pid`` is a live process that existed when the run started (not a reused id, not a zombie)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return run_started is None or created <= run_started + _PID_REUSE_SLACK_S


@dataclass(frozen=True)
class Reaped:
    run_id: str
    job_name: str
    status: str
    pids: tuple[int, ...]
    freed_slots: int

    def describe(self) -> str:
        processes = ", ".join(str(pid) for pid in self.pids)
        return (
            f"run {self.run_id} ({self.job_name}) was {self.status} but its process(es) {processes} are gone "
            f"(killed, out of memory or power loss): marked it failed and freed {self.freed_slots} pool slot(s)"
        )


def _freed(instance: dg.DagsterInstance, run_id: str) -> int:
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return 0
    before = _claimed_by(instance, run_id)
    storage.free_concurrency_slots_for_run(run_id)
    return before


def _claimed_by(instance: dg.DagsterInstance, run_id: str) -> int:
    storage = instance.event_log_storage
    count = 0
    for pool in storage.get_concurrency_keys():
        count += sum(1 for slot in storage.get_concurrency_info(pool).claimed_slots if slot.run_id == run_id)
    return count


def reap_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[Reaped]:
    """Mark unfinished runs with no live process failed and free their slots; free slots of ended runs."""
    if not reaping_enabled():
        return []
    reaped: list[Reaped] = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=ACTIVE_STATUSES)):
        run = record.dagster_run
        pids = run_processes(instance, run.run_id)
        if not pids:
            continue  # no event written yet: nothing proves the run is dead, and it holds no slot
        if any(process_alive(pid, record.start_time or record.create_timestamp.timestamp()) for pid in pids):
            continue
        status = run.status.value
        instance.report_run_failed(
            run,
            message=(
                f"Process(es) {', '.join(map(str, sorted(pids)))} of this run are gone (killed, out of memory "
                "or power loss); marked failed so its pool slots are freed."
            ),
        )
        done = Reaped(run.run_id, run.job_name, status, tuple(sorted(pids)), _freed(instance, run.run_id))
        log(done.describe())
        reaped.append(done)

    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        holders = storage.get_concurrency_run_ids()
        if holders:
            for record in instance.get_run_records(dg.RunsFilter(run_ids=list(holders))):
                run = record.dagster_run
                if run.is_finished:
                    freed = _freed(instance, run.run_id)
                    if freed:
                        log(f"run {run.run_id} ({run.job_name}) ended {run.status.value}: freed {freed} pool slot(s)")
    return reaped


@dataclass(frozen=True)
class Holder:
    pool: str
    run_id: str
    step_key: str
    since: datetime | None

    def describe(self) -> str:
        since = f" since {self.since.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC" if self.since else ""
        return f"pool {self.pool} is held by run {self.run_id} (step {self.step_key}){since}"


def pool_holders(instance: dg.DagsterInstance, pools: set[str]) -> list[Holder]:
    """Slots of ``pools`` that are full, and who holds them (run, step, since when)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    holders: list[Holder] = []
    for pool in sorted(pools):
        info = storage.get_concurrency_info(pool)
        if info.limit is None or len(info.claimed_slots) < info.limit:
            continue
        assigned = {
            (step.run_id, step.step_key): step.assigned_timestamp or step.enqueued_timestamp
            for step in info.pending_steps
        }
        for slot in info.claimed_slots:
            holders.append(Holder(pool, slot.run_id, slot.step_key, assigned.get((slot.run_id, slot.step_key))))
    return holders


def wait_for_pools(
    instance: dg.DagsterInstance,
    pools: set[str],
    log: Callable[[str], None] = print,
    poll_s: float = 5.0,
    report_every_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Block until every pool in ``pools`` has a free slot, reaping dead runs; returns the seconds waited.

    While waiting, says which run and step hold each pool and since when, at the start and every
    ``report_every_s`` seconds.
    """
    waited = 0.0
    last_report: float | None = None
    while True:
        reap_dead_runs(instance, log)
        holders = pool_holders(instance, pools)
        if not holders:
            if waited:
                log(f"pool(s) {', '.join(sorted(pools))} free after waiting {waited:.0f} s")
            return waited
        if last_report is None or waited - last_report >= report_every_s:
            for holder in holders:
                log(f"waiting for a slot: {holder.describe()}; its process is alive, so the run is still working")
            last_report = waited
        sleep(poll_s)
        waited += poll_s


def reaper_sensor() -> dg.SensorDefinition:
    """Every minute while the daemon runs: dead runs are failed and their slots freed. Launches nothing."""

    @dg.sensor(
        name=REAPER_SENSOR,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Marks runs whose processes are gone (killed, out of memory, power loss) failed and frees the pool "
            "slots they hold, so the next gpu step does not wait forever. Launches no run."
        ),
    )
    def jpslm_dead_run_reaper(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        if not reaping_enabled():
            return dg.SkipReason(f"switched off ({REAP_ENV}=false)")
        lines: list[str] = []
        reaped = reap_dead_runs(context.instance, log=lines.append)
        for line in lines:
            context.log.warning(line)
        if reaped:
            return dg.SkipReason("; ".join(item.describe() for item in reaped))
        return dg.SkipReason("no dead runs")

    return jpslm_dead_run_reaper
