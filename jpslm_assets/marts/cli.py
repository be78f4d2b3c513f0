"""The ``jpslm-sql`` command line: the marts of ``dbt_like_sql/`` outside Dagster, against any DuckDB file or
the DuckLake the settings select. What a models folder holds is in ``sql_project``; running is ``sql_runs``.

Command line (``jpslm-sql``)::

    jpslm-sql run  [--db FILE] [--select NAME|+NAME ...]   # build models in dependency order, atomically
    jpslm-sql test [--db FILE]                             # run SQL tests; exit 1 when one fails
    jpslm-sql list                                         # models, kinds and dependencies in build order
    jpslm-sql load-scores FILE.csv [--db FILE]             # another judge's scores into eval.judge_scores
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import duckdb

from jpslm_assets.marts.sql_project import MODELS_DIR_ENV, TARGET_SCHEMA, SqlProjectError, load_project
from jpslm_assets.marts.sql_runs import ModelRunError, run_models, run_tests


def _default_db() -> str:
    from jpslm_assets import settings

    return str(settings.duckdb_path())


def main(argv: Sequence[str] | None = None) -> int:
    """``jpslm-sql run|test|list``: the marts outside Dagster, against any DuckDB file."""
    parser = argparse.ArgumentParser(prog="jpslm-sql", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help=f"models folder (default: ${MODELS_DIR_ENV} or dbt_like_sql/)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="build the marts in dependency order (all or nothing)")
    run_parser.add_argument(
        "--db", default=None, help="DuckDB file (default: the project's, see JPSLM_DUCKDB_PATH)"
    )
    run_parser.add_argument(
        "--select", nargs="+", default=None, help="models to build; +name adds its upstream"
    )
    test_parser = commands.add_parser(
        "test", help="run the SQL tests; exit status 1 when an error-severity test fails"
    )
    test_parser.add_argument("--db", default=None, help="DuckDB file (default: the project's)")
    commands.add_parser("list", help="models in build order with their kind and dependencies")
    load_parser = commands.add_parser(
        "load-scores", help="load a CSV of judge scores (the documented columns) into eval.judge_scores"
    )
    load_parser.add_argument("csv", type=Path, help="CSV with a header row holding the contract's columns")
    load_parser.add_argument("--db", default=None, help="DuckDB file (default: the project's)")
    args = parser.parse_args(argv)

    try:
        project = load_project(args.models_dir)
    except SqlProjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "list":
        for name in project.order:
            model = project.models[name]
            reads = ", ".join(sorted(model.reads)) or "-"
            print(f"{name:28s} {model.kind:6s} reads {reads}")
        for test in sorted(project.tests.values(), key=lambda t: t.name):
            print(f"test {test.name:33s} on {project.test_target(test)} ({test.severity})")
        return 0

    from jpslm_assets.store import StoreError, default_store, open_duckdb

    # Without --db: the store the settings select, which may be a DuckLake (JPSLM_STORE=ducklake).
    store = default_store() if args.db is None else None
    lake = store if store is not None and store.is_lake else None
    db = lake.location if lake is not None else (args.db or _default_db())
    if lake is None and args.command == "test" and not Path(db).exists():
        print(f"error: DuckDB file {db} does not exist; run `jpslm-sql run --db {db}` first", file=sys.stderr)
        return 2
    stack = contextlib.ExitStack()
    try:
        if lake is not None:
            conn = stack.enter_context(lake.connect())
        else:
            conn = open_duckdb(db, read_only=args.command == "test")
            stack.callback(conn.close)
    except (duckdb.Error, StoreError) as exc:
        print(f"error: cannot open {db}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "load-scores":
            from jpslm_assets.marts.score_import import TABLE, ScoreImportError, load_scores

            try:
                loaded = load_scores(conn, args.csv, project.sources[TABLE])
            except (ScoreImportError, duckdb.Error) as exc:
                print(f"error: {exc}\nnothing was changed in {db}", file=sys.stderr)
                return 2
            print(f"loaded {loaded} rows from {args.csv} into {TABLE} in {db}; now `jpslm-sql run --db {db}`")
            return 0
        if args.command == "run":
            try:
                summaries = run_models(conn, project, args.select)
            except (ModelRunError, SqlProjectError, duckdb.Error) as exc:
                print(f"error: {exc}\nnothing was changed in {db}", file=sys.stderr)
                return 2
            for summary in summaries:
                note = (
                    f"  (empty sources: {', '.join(summary.stubbed_sources)})"
                    if summary.stubbed_sources
                    else ""
                )
                print(f"built {TARGET_SCHEMA}.{summary.model}: {summary.rows} rows{note}")
            print(f"{len(summaries)} models built in {db}")
            return 0
        results = run_tests(conn, project)
    finally:
        stack.close()
    failed = 0
    for result in results:
        if result.passed:
            status = "PASS"
        elif result.severity == "warn" and result.error is None:
            status = "WARN"
        else:
            status = "FAIL"
            failed += 1
        detail = result.error or (
            f"{result.failing_rows} failing rows: {result.sample}" if result.failing_rows else ""
        )
        print(f"{status} {result.name} on {TARGET_SCHEMA}.{result.target}{'  ' + detail if detail else ''}")
    print(f"{len(results) - failed} of {len(results)} tests passed or warned")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
