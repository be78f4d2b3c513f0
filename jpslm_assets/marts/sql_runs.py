"""Building the models of a ``dbt_like_sql/`` project (``sql_project``) into the ``marts`` schema of a DuckDB
file, in dependency order and atomically, and running its SQL tests. A source table that does not exist
yet reads as an empty table of its contract's columns.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import duckdb
import polars as pl
import sqlglot
from sqlglot import exp

from jpslm_assets.marts.sql_project import CONTRACT_DOCS, DIALECT, TARGET_SCHEMA, Model, Project, Source


class ModelRunError(RuntimeError):
    """A model failed to build; nothing of the run was committed."""


def existing_tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_catalog = current_database()"
    ).fetchall()
    return {row[0] for row in rows}


def _empty_relation(source: Source) -> exp.Select:
    columns = ", ".join(f'CAST(NULL AS {kind}) AS "{name}"' for name, kind in source.columns.items())
    select = sqlglot.parse_one(f"SELECT {columns} WHERE FALSE", read=DIALECT)
    assert isinstance(select, exp.Select)
    return select


class MissingColumnError(ValueError):
    """A source table lacks a column the marts need; the message names table, column and contract."""


def table_columns(conn: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    schema, name = table.split(".")
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
        "AND table_catalog = current_database()",
        [schema, name],
    ).fetchall()
    return {row[0] for row in rows}


def _with_optional_columns(source: Source, missing: list[str]) -> exp.Select:
    extra = ", ".join(f'CAST(NULL AS {source.columns[name]}) AS "{name}"' for name in missing)
    select = sqlglot.parse_one(f"SELECT *, {extra} FROM {source.table}", read=DIALECT)
    assert isinstance(select, exp.Select)
    return select


def resolve_missing_sources(
    sql: str,
    sources: dict[str, Source],
    present: set[str],
    columns: Mapping[str, set[str]] | None = None,
) -> tuple[str, list[str]]:
    """Rewrite reads of absent sources into empty typed relations, and reads of present sources that lack
    optional columns into relations that add them as NULL; returns the SQL and what was stubbed.

    ``columns``: the columns each present source table has (sources not listed are taken as complete).
    Raises :class:`MissingColumnError` when a present source lacks a required column.
    """
    tree = sqlglot.parse_one(sql, read=DIALECT)
    stubbed: list[str] = []
    changed = False

    def replace(node: exp.Expression) -> exp.Expression:
        nonlocal changed
        if isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier) and node.db:
            name = f"{node.db}.{node.name}"
            if name not in sources:
                return node
            alias = exp.TableAlias(this=exp.to_identifier(node.alias_or_name))
            if name not in present:
                stubbed.append(name)
                changed = True
                return exp.Subquery(this=_empty_relation(sources[name]), alias=alias)
            have = (columns or {}).get(name)
            if have is None:
                return node
            source = sources[name]
            absent = [column for column in source.columns if column not in have]
            required = [column for column in absent if column not in source.optional]
            if required:
                raise MissingColumnError(
                    f"table {name} lacks required column(s) {required}; the marts read them (the contract is in "
                    f"{CONTRACT_DOCS}). Add the column(s), or re-materialize the asset that writes {name}."
                )
            if absent:
                changed = True
                return exp.Subquery(this=_with_optional_columns(source, absent), alias=alias)
        return node

    rewritten = tree.transform(replace)
    if not changed:
        return sql, []
    return rewritten.sql(dialect=DIALECT), sorted(set(stubbed))


def source_columns(conn: duckdb.DuckDBPyConnection, sources: dict[str, Source], present: set[str]) -> dict[str, set[str]]:
    return {name: table_columns(conn, name) for name in sources if name in present}


def _load_python_model(model: Model) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"jpslm_sql_model_{model.name}", model.path)
    if spec is None or spec.loader is None:
        raise ModelRunError(f"cannot import Python model {model.path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class BuildResult:
    model: str
    frame: pl.DataFrame
    stubbed_sources: list[str]


def build_model(conn: duckdb.DuckDBPyConnection, project: Project, name: str) -> BuildResult:
    """Compute one model's rows (nothing is written); upstream model tables must already exist."""
    model = project.models[name]
    present = existing_tables(conn)
    missing_models = sorted(
        f"{TARGET_SCHEMA}.{dep}" for dep in model.depends_on if f"{TARGET_SCHEMA}.{dep}" not in present
    )
    if missing_models:
        raise ModelRunError(
            f"model {name} ({model.path.name}) reads {missing_models}, which are not built yet: "
            f"run `jpslm-sql run --select +{name}` or materialize those marts first"
        )
    stubbed: list[str] = []
    try:
        if model.sql is None:
            frame_in = None
        else:
            columns = source_columns(conn, project.sources, present)
            sql, stubbed = resolve_missing_sources(model.sql, project.sources, present, columns)
            frame_in = conn.execute(sql).pl()
        frame = frame_in if model.kind == "sql" else _load_python_model(model).model(frame_in)
    except MissingColumnError as exc:
        raise ModelRunError(f"model {name} ({model.path.name}): {exc}") from exc
    except duckdb.Error as exc:
        raise ModelRunError(f"model {name} ({model.path}) failed in DuckDB: {exc}") from exc
    if not isinstance(frame, pl.DataFrame):
        raise ModelRunError(
            f"Python model {model.path} returned {type(frame).__name__}, not a polars DataFrame"
        )
    # An undefined statistic (kappa of constant raters, an interval of nothing) is NULL in SQL, not NaN:
    # NaN compares greater than every number in DuckDB and would slip past range tests and averages.
    floats = [c for c, dtype in frame.schema.items() if dtype in (pl.Float32, pl.Float64)]
    if floats:
        frame = frame.with_columns(pl.col(floats).fill_nan(None))
    return BuildResult(name, frame, stubbed)


@dataclass
class RunSummary:
    model: str
    rows: int
    stubbed_sources: list[str]


def run_models(
    conn: duckdb.DuckDBPyConnection, project: Project, selectors: Sequence[str] | None = None
) -> list[RunSummary]:
    """Build the selected models in order inside one transaction: all of them are replaced, or none."""
    names = project.select(selectors)
    summaries: list[RunSummary] = []
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{TARGET_SCHEMA}"')
        for name in names:
            result = build_model(conn, project, name)
            conn.register("model_frame", result.frame.to_arrow())
            try:
                conn.execute(
                    f'CREATE OR REPLACE TABLE "{TARGET_SCHEMA}"."{name}" AS SELECT * FROM model_frame'
                )
            finally:
                conn.unregister("model_frame")
            summaries.append(RunSummary(name, result.frame.height, result.stubbed_sources))
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    return summaries


@dataclass
class TestResult:
    name: str
    target: str
    severity: str
    failing_rows: int
    sample: list[dict[str, Any]]
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.failing_rows == 0


def run_test(
    conn: duckdb.DuckDBPyConnection, project: Project, name: str, sample_rows: int = 5
) -> TestResult:
    """Run one SQL test; its failing rows (a few kept as a sample) or the error that stopped it."""
    test = project.tests[name]
    target = project.test_target(test)
    present = existing_tables(conn)
    missing = sorted(f"{TARGET_SCHEMA}.{m}" for m in test.models if f"{TARGET_SCHEMA}.{m}" not in present)
    if missing:
        return TestResult(
            name, target, test.severity, 0, [], f"models {missing} are not built; run them first"
        )
    try:
        columns = source_columns(conn, project.sources, present)
        sql, _ = resolve_missing_sources(test.sql, project.sources, present, columns)
        frame = conn.execute(sql).pl()
    except MissingColumnError as exc:
        return TestResult(name, target, test.severity, 0, [], str(exc))
    except duckdb.Error as exc:
        return TestResult(name, target, test.severity, 0, [], f"test query failed: {exc}")
    return TestResult(name, target, test.severity, frame.height, frame.head(sample_rows).to_dicts())


def run_tests(conn: duckdb.DuckDBPyConnection, project: Project) -> list[TestResult]:
    return [run_test(conn, project, name) for name in sorted(project.tests)]
