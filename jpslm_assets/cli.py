"""``jpslm``: run the whole pipeline (``demo``), open the UI (``ui``), trace lineage (``lineage``).

``jpslm demo`` materializes every asset of the active profile in dependency order through the same
Dagster instance the UI uses (``DAGSTER_HOME``, default ``<data dir>/dagster_home``), so its runs appear in
the UI. Asset partitions that Dagster already considers up to date (same code version, same upstream data
versions) are skipped, so an unchanged re-run does no work.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jpslm_assets import settings

# Groups whose model x n assets run over the whole grid; the others run at the chosen n only.
GRID_GROUPS = frozenset({"training", "evaluation"})


@dataclass
class Batch:
    keys: list  # list[dg.AssetKey]
    partition_keys: list[str | None]


def _prepare_environment(profile: str | None) -> None:
    if profile:
        os.environ[settings.PROFILE_ENV] = profile
    settings.load_profile()  # fail fast on a bad profile name or override
    settings.data_dir()  # fail fast on an unwritable data directory
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home())
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stale_resolver(instance, defs):
    # Dagster exposes staleness publicly only in the UI and for schedules (stale_assets_only); this is the
    # resolver both use, built the way Dagster's own test helpers build it.
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    asset_graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    return CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)


def plan_batches(defs, chosen_n: Callable[[], int | None]) -> list[Callable[[], Batch]]:
    """Order assets by dependency and group consecutive ones sharing a partition plan into batches.

    Among ready assets the order prefers one that continues the current batch (fewer runs), then any asset
    not at "the chosen n": those can only be planned once the scale stage has run.
    """
    import dagster as dg

    graph = defs.resolve_asset_graph()
    keys = {key for key in graph.get_all_asset_keys() if graph.get(key).is_materializable}

    def partition_plan(key: dg.AssetKey) -> tuple[str, Callable[[], list[str | None]]]:
        node = graph.get(key)
        partitions = node.partitions_def
        if partitions is None:
            return "none", lambda: [None]
        signature = ",".join(partitions.get_partition_keys())
        if isinstance(partitions, dg.MultiPartitionsDefinition) and node.group_name not in GRID_GROUPS:

            def at_chosen_n() -> list[str | None]:
                n = chosen_n()
                if n is None:
                    raise RuntimeError("no optimal n is known yet: the scale stage did not produce one")
                return [k for k in partitions.get_partition_keys() if k.keys_by_dimension["n"] == str(n)]

            return f"chosen:{signature}", at_chosen_n
        return f"all:{signature}", lambda: list(partitions.get_partition_keys())

    plans = {key: partition_plan(key) for key in keys}
    waiting = {key: {p for p in graph.get(key).parent_keys if p in keys} for key in keys}
    order: list[dg.AssetKey] = []
    current_plan = ""
    while waiting:
        ready = [key for key, parents in waiting.items() if not parents]
        if not ready:
            raise RuntimeError(f"asset graph has a cycle among {sorted(k.to_user_string() for k in waiting)}")
        key = min(
            ready,
            key=lambda k: (
                plans[k][0] != current_plan,
                plans[k][0].startswith("chosen:"),
                k.to_user_string(),
            ),
        )
        order.append(key)
        current_plan = plans[key][0]
        del waiting[key]
        for parents in waiting.values():
            parents.discard(key)

    batches: list[Callable[[], Batch]] = []
    current: list[dg.AssetKey] = []
    for key in order:
        if current and plans[key][0] != plans[current[-1]][0]:
            batches.append(_batch(current, plans[current[-1]][1]))
            current = []
        current.append(key)
    if current:
        batches.append(_batch(current, plans[current[-1]][1]))
    return batches


def _batch(keys: list, partitions: Callable[[], list[str | None]]) -> Callable[[], Batch]:
    frozen = list(keys)
    return lambda: Batch(frozen, partitions())


def run_demo(force: bool = False, log: Callable[[str], None] = print) -> int:
    """Materialize everything the profile defines, skipping up-to-date partitions. Returns runs launched."""
    import dagster as dg
    from dagster._core.definitions.data_version import StaleStatus

    from jpslm_assets.definitions import defs
    from jpslm_assets.store import default_store
    from jpslm_assets.training import chosen_n

    store = default_store()
    instance = dg.DagsterInstance.get()
    job = defs.resolve_implicit_global_asset_job_def()
    launched = 0
    started = time.monotonic()
    for make_batch in plan_batches(defs, lambda: chosen_n(store)):
        batch = make_batch()
        for partition_key in batch.partition_keys:
            resolver = _stale_resolver(instance, defs)
            todo = [
                key
                for key in batch.keys
                if force or resolver.get_status(key, partition_key) != StaleStatus.FRESH
            ]
            names = ", ".join(key.to_user_string() for key in batch.keys)
            where = f" [{partition_key}]" if partition_key else ""
            if not todo:
                log(f"up to date{where}: {names}")
                continue
            log(f"materializing{where}: {', '.join(k.to_user_string() for k in todo)}")
            result = job.execute_in_process(
                instance=instance,
                partition_key=partition_key,
                asset_selection=todo,
                raise_on_error=False,
                tags={"jpslm/launched_by": "jpslm demo"},
            )
            launched += 1
            if not result.success:
                failed = [e for e in result.all_events if e.is_failure]
                detail = failed[0].message if failed else "see the run in the UI"
                raise SystemExit(f"run {result.run_id} failed{where}: {detail}")
    log(f"demo finished in {time.monotonic() - started:.0f} s ({launched} runs launched)")
    return launched


def port_problem(host: str, port: int) -> str | None:
    """Why the UI cannot listen on ``host:port`` (port in use, unknown host), or None when it can.

    Binds the way the web server will (SO_REUSEADDR, so a port left in TIME_WAIT by an earlier UI counts as
    free) and lets go at once.
    """
    another = f"Choose another port with `jpslm ui --port {port + 1}` (any free port works)"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host!r} cannot be resolved ({exc.strerror}); pass a host name or address with --host."
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        f"port {port} on {host} is already in use (another program, perhaps a UI started "
                        f"earlier, is listening there). {another}, or stop that program."
                    )
                return f"cannot listen on {host}:{port} ({exc.strerror}). {another}."
    return None


def print_summary() -> None:
    from jpslm_assets.store import default_store

    store = default_store()
    if store.table_exists("marts.score_summary"):
        frame = store.query(
            "SELECT model, n, format, questions, avg_score, ci_low, ci_high, perfect_rate "
            "FROM marts.score_summary ORDER BY model, format"
        )
        print(frame)
    print(f"DuckDB file: {store.file}\nOpen the UI with: jpslm ui")


LINEAGE_SQL = """
WITH RECURSIVE start AS (
    SELECT m.materialization_id, m.asset_key, m.partition_key
    FROM lineage.materializations m
    WHERE m.asset_key = ? AND m.partition_key = ?
    ORDER BY m.materialized_at DESC LIMIT 1
), walk(materialization_id, asset_key, partition_key, depth) AS (
    SELECT materialization_id, asset_key, partition_key, 0 FROM start
    UNION
    SELECT i.upstream_materialization_id, i.upstream_asset_key, i.upstream_partition_key, w.depth + 1
    FROM walk w JOIN lineage.inputs i ON i.materialization_id = w.materialization_id
    WHERE i.upstream_materialization_id IS NOT NULL
)
SELECT w.depth, w.asset_key, w.partition_key, m.data_version, m.code_version, m.materialized_at,
       m.artifact_path
FROM walk w JOIN lineage.materializations m USING (materialization_id)
ORDER BY w.depth, w.asset_key, w.partition_key
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpslm", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="profile name (default: $JPSLM_PROFILE or demo)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="materialize every asset of the profile, skipping up-to-date work")
    demo.add_argument("--force", action="store_true", help="re-run even up-to-date partitions")
    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this project")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    lineage = sub.add_parser("lineage", help="walk from an asset partition back to the knowledge graph")
    lineage.add_argument("asset", help="asset key, e.g. judge_scores_f16")
    lineage.add_argument("partition", help="partition key, e.g. 'tiny-llama|120'")
    args = parser.parse_args(argv)

    try:
        _prepare_environment(args.profile)
    except settings.SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "demo":
        run_demo(force=args.force)
        print_summary()
        return 0
    if args.command == "ui":
        problem = port_problem(args.host, args.port)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        workspace = Path.cwd() / "workspace.yaml"
        target = ["-w", str(workspace)] if workspace.exists() else ["-m", "jpslm_assets.definitions"]
        command = ["dagster", "dev", *target, "--host", args.host, "--port", str(args.port)]
        print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}\n$ {' '.join(command)}")
        return subprocess.call(command)
    if args.command == "lineage":
        from jpslm_assets.store import default_store

        print(default_store().query(LINEAGE_SQL, [args.asset, args.partition]))
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
