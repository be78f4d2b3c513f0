"""``jpslm``: run the whole pipeline (``demo``), open the UI (``ui``), trace lineage (``lineage``).

``jpslm demo`` materializes every asset of the active profile in dependency order through the same
Dagster instance the UI uses (``DAGSTER_HOME``, default ``<data dir>/dagster_home``), so its runs appear in
the UI. An asset partition is skipped when it is up to date: materialized with its current code version and
after everything it depends on (``UpToDate``), so an unchanged re-run does no work. Public Dagster APIs only.
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

CODE_VERSION_TAG = "dagster/code_version"  # the tag Dagster writes on every materialization


@dataclass
class Batch:
    keys: list  # list[dg.AssetKey]
    partition_keys: list[str | None]


INSTANCE_LOCK = ".instance.lock"
INSTANCE_READY = ".instance-ready"


def prepare_instance(home: Path) -> None:
    """Create the Dagster instance's storage in ``home`` once, one process at a time.

    Dagster creates its SQLite databases (runs, event log index, schedules) when a process first opens the
    instance. Two processes doing that at once on a fresh DAGSTER_HOME (the UI's web server and daemon, or
    ``jpslm demo`` started beside ``jpslm ui``) can both stamp a schema version into the same database, and
    from then on every start fails with "Version table 'alembic_version' has more than one head". Every
    ``jpslm`` command calls this before Dagster opens the instance: under a file lock in ``home``, the first
    one opens the instance (creating the storage) and leaves a marker; the others wait and find it ready.
    """
    import dagster as dg
    from filelock import FileLock

    with FileLock(str(home / INSTANCE_LOCK), timeout=600):
        if (home / INSTANCE_READY).exists():
            return
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.get_runs(limit=1)  # the run, event log and schedule storage all exist from here on
        (home / INSTANCE_READY).touch()


def _prepare_environment(profile: str | None) -> None:
    if profile:
        os.environ[settings.PROFILE_ENV] = profile
    settings.load_profile()  # fail fast on a bad profile name or override
    settings.data_dir()  # fail fast on an unwritable data directory
    home = settings.dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    prepare_instance(home)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plan_batches(defs) -> list[Batch]:
    """Order assets by dependency and group consecutive ones sharing a partitions definition into batches.

    Among ready assets the order prefers one that continues the current batch (fewer runs).
    """
    graph = defs.resolve_asset_graph()
    keys = {key for key in graph.get_all_asset_keys() if graph.get(key).is_materializable}

    def signature(key) -> str:
        partitions = graph.get(key).partitions_def
        return "none" if partitions is None else ",".join(partitions.get_partition_keys())

    waiting = {key: {p for p in graph.get(key).parent_keys if p in keys} for key in keys}
    order: list = []
    current = ""
    while waiting:
        ready = [key for key, parents in waiting.items() if not parents]
        if not ready:
            raise RuntimeError(f"asset graph has a cycle among {sorted(k.to_user_string() for k in waiting)}")
        key = min(ready, key=lambda k: (signature(k) != current, k.to_user_string()))
        order.append(key)
        current = signature(key)
        del waiting[key]
        for parents in waiting.values():
            parents.discard(key)

    batches: list[Batch] = []
    for key in order:
        if batches and signature(batches[-1].keys[-1]) == signature(key):
            batches[-1].keys.append(key)
            continue
        partitions = graph.get(key).partitions_def
        batches.append(Batch([key], [None] if partitions is None else list(partitions.get_partition_keys())))
    return batches


class UpToDate:
    """Whether an asset partition needs a run, from public materialization records only.

    A partition is up to date when it has a materialization, that materialization carries the asset's
    current code version, and no partition it depends on (through the graph's partition mappings) was
    materialized after it. This is stricter than Dagster's data-version staleness (an upstream re-run that
    wrote the same data still counts), never looser, so an asset the demo leaves alone is never stale.
    """

    def __init__(self, instance, defs) -> None:
        self.instance = instance
        self.graph = defs.resolve_asset_graph()

    def _latest(self, key, partitions: list[str] | None):
        import dagster as dg

        if partitions == []:
            return None
        records = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions), limit=1
        ).records
        return records[0] if records else None

    def _upstream_partitions(self, key, parent, partition_key: str | None) -> list[str] | None:
        node, parent_node = self.graph.get(key), self.graph.get(parent)
        if parent_node.partitions_def is None:
            return None
        if node.partitions_def is None or partition_key is None:
            return list(parent_node.partitions_def.get_partition_keys())
        mapping = self.graph.get_partition_mapping(key, parent)
        result = mapping.get_upstream_mapped_partitions_result_for_partitions(
            node.partitions_def.subset_with_partition_keys([partition_key]),
            node.partitions_def,
            parent_node.partitions_def,
        )
        return sorted(result.partitions_subset.get_partition_keys())

    def reason(self, key, partition_key: str | None) -> str | None:
        """Why ``key[partition_key]`` needs a run, or None when it is up to date."""
        node = self.graph.get(key)
        record = self._latest(key, [partition_key] if partition_key is not None else None)
        if record is None:
            return "never materialized"
        tags = record.asset_materialization.tags if record.asset_materialization else {}
        recorded = (tags or {}).get(CODE_VERSION_TAG)
        if node.code_version is not None and recorded != node.code_version:
            return f"code version {recorded} -> {node.code_version}"
        for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
            if not self.graph.get(parent).is_materializable:
                continue
            upstream = self._latest(parent, self._upstream_partitions(key, parent, partition_key))
            if upstream is not None and upstream.storage_id > record.storage_id:
                return f"{parent.to_user_string()} was materialized after it"
        return None


def run_demo(force: bool = False, log: Callable[[str], None] = print) -> int:
    """Materialize everything the profile defines, skipping up-to-date partitions. Returns runs launched."""
    import dagster as dg

    from jpslm_assets import run_recovery
    from jpslm_assets.definitions import defs
    from jpslm_assets.store import default_store

    instance = dg.DagsterInstance.get()
    job = defs.resolve_implicit_global_asset_job_def()
    graph = defs.resolve_asset_graph()
    freshness = UpToDate(instance, defs)
    run_recovery.reap_dead_runs(instance, log)
    default_store().check_integrity()  # a damaged store is named before any run starts
    launched = 0
    started = time.monotonic()
    for batch in plan_batches(defs):
        for partition_key in batch.partition_keys:
            todo = []
            for key in batch.keys:
                why = "--force" if force else freshness.reason(key, partition_key)
                if why:
                    todo.append((key, why))
            names = ", ".join(key.to_user_string() for key in batch.keys)
            where = f" [{partition_key}]" if partition_key else ""
            if not todo:
                log(f"up to date{where}: {names}")
                continue
            log(f"materializing{where}: " + ", ".join(f"{k.to_user_string()} ({why})" for k, why in todo))
            pools = set().union(*(graph.get(key).pools or set() for key, _ in todo))
            if pools:
                run_recovery.wait_for_pools(instance, pools, log)
            result = job.execute_in_process(
                instance=instance,
                partition_key=partition_key,
                asset_selection=[key for key, _ in todo],
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
    print(f"Store: {store.location}\nOpen the UI with: jpslm ui")


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
    lineage.add_argument("partition", help="partition key, e.g. tiny-llama (a stage-3 adapter) or 60 (an n)")
    args = parser.parse_args(argv)

    try:
        _prepare_environment(args.profile)
    except settings.SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "demo":
        from jpslm_assets.store import StoreError

        try:
            run_demo(force=args.force)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print_summary()
        return 0
    if args.command == "ui":
        if not _is_loopback(args.host):
            print(
                f"warning: --host {args.host} serves the UI beyond this machine; Dagster's UI has no login, so anyone "
                "who reaches the port can launch, cancel and wipe runs. Use 127.0.0.1 (the default) and an SSH "
                "tunnel, or put an authenticating proxy in front.",
                file=sys.stderr,
            )
        problem = port_problem(args.host, args.port)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        import dagster as dg

        from jpslm_assets import run_recovery

        with dg.DagsterInstance.get() as instance:
            run_recovery.reap_dead_runs(instance)
        workspace = Path.cwd() / "workspace.yaml"
        target = ["-w", str(workspace)] if workspace.exists() else ["-m", "jpslm_assets.definitions"]
        # This interpreter's own Dagster: `.venv/bin/jpslm ui` works without the venv on PATH.
        command = [sys.executable, "-m", "dagster", "dev", *target, "--host", args.host, "--port", str(args.port)]
        print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}\n$ {' '.join(command)}")
        return subprocess.call(command)
    if args.command == "lineage":
        from jpslm_assets.store import StoreError, default_store

        try:
            print(default_store().query(LINEAGE_SQL, [args.asset, args.partition]))
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    return 1


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolve it
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


if __name__ == "__main__":
    raise SystemExit(main())
