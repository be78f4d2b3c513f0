"""A small dbt-like runner for ``dbt_like_sql/``: SQL and Python models into the ``marts`` schema, SQL tests.

Layout of a models folder:

- ``<name>.sql``: one SELECT; builds table ``marts.<name>``. Its first comment lines are its description.
- ``<name>.py``: a Python model for what SQL does badly (bootstrap intervals, Wilcoxon tests, kappa). The
  module's docstring is its description; ``SOURCE`` is a SELECT whose result is passed to
  ``model(frame) -> polars.DataFrame`` (``SOURCE = None`` passes ``None``).
- ``tests/<name>.sql``: a query returning the rows that violate an expectation; zero rows = pass. A line
  ``-- severity: warn`` makes a failure a warning.
- ``sources.yml``: the tables other stages write (``eval.judge_scores``...) with their columns. A source that
  does not exist yet reads as an empty table of those columns, so every mart exists (with zero rows) on a
  fresh database instead of failing. Columns listed under a source's ``optional`` may be absent from the
  table (scores brought from another tool, a store written before the column existed): they read as NULL.
  A missing required column is an error naming the table, the column and where the contract is.

Dependencies are never listed by hand: every table a model's SQL (or a Python model's ``SOURCE``) reads is
found by parsing it with sqlglot; ``marts.*`` tables are other models, anything else is a source.

Command line (``jpslm-sql``)::

    jpslm-sql run  [--db FILE] [--select NAME|+NAME ...]   # build models in dependency order, atomically
    jpslm-sql test [--db FILE]                             # run SQL tests; exit 1 when one fails
    jpslm-sql list                                         # models, kinds and dependencies in build order
    jpslm-sql load-scores FILE.csv [--db FILE]             # another judge's scores into eval.judge_scores
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import duckdb
import polars as pl
import sqlglot
import yaml
from sqlglot import exp

TARGET_SCHEMA = "marts"
MODELS_DIR_ENV = "JPSLM_SQL_DIR"
DIALECT = "duckdb"


class SqlProjectError(ValueError):
    """The models folder is inconsistent (bad SQL, unknown reference, cycle); the message names the file."""


class ModelRunError(RuntimeError):
    """A model failed to build; nothing of the run was committed."""


def default_models_dir() -> Path:
    """``$JPSLM_SQL_DIR``, else ``dbt_like_sql/`` next to the package (the repository root)."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "dbt_like_sql"


# ------------------------------------------------------------------------------------------- project


@dataclass(frozen=True)
class Source:
    table: str
    columns: dict[str, str]
    description: str = ""
    optional: frozenset[str] = frozenset()


@dataclass
class Model:
    name: str
    path: Path
    kind: Literal["sql", "python"]
    sql: str | None
    description: str
    reads: frozenset[str]
    code_version: str
    depends_on: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()

    @property
    def table(self) -> str:
        return f"{TARGET_SCHEMA}.{self.name}"


@dataclass
class SqlTest:
    name: str
    path: Path
    sql: str
    description: str
    reads: frozenset[str]
    severity: Literal["error", "warn"]
    models: frozenset[str] = frozenset()


@dataclass
class Project:
    folder: Path
    models: dict[str, Model]
    tests: dict[str, SqlTest]
    sources: dict[str, Source]
    order: list[str] = field(default_factory=list)

    def upstream(self, name: str) -> list[str]:
        """``name`` and every model it depends on, in build order."""
        wanted: set[str] = set()
        stack = [name]
        while stack:
            current = stack.pop()
            if current in wanted:
                continue
            wanted.add(current)
            stack.extend(self.models[current].depends_on)
        return [model for model in self.order if model in wanted]

    def select(self, selectors: Sequence[str] | None) -> list[str]:
        """Models named by selectors (``name`` or ``+name`` with its ancestors), in build order."""
        if not selectors:
            return list(self.order)
        chosen: set[str] = set()
        for selector in selectors:
            name = selector.lstrip("+")
            if name not in self.models:
                raise SqlProjectError(
                    f"--select {selector!r}: no model {name!r} in {self.folder}; models: {', '.join(self.order)}"
                )
            chosen.update(self.upstream(name) if selector.startswith("+") else [name])
        return [model for model in self.order if model in chosen]

    def test_target(self, test: SqlTest) -> str:
        """The model a test checks: the one its name starts with (``score_summary_unique`` checks
        ``score_summary``), else the last in build order of the models it reads."""
        named = [m for m in test.models if test.name == m or test.name.startswith(m + "_")]
        if named:
            return max(named, key=len)
        return max(test.models, key=self.order.index)


def referenced_tables(sql: str, origin: str) -> frozenset[str]:
    """``schema.table`` names a query reads (CTE names and table functions excluded)."""
    try:
        statements = sqlglot.parse(sql, read=DIALECT)
    except sqlglot.errors.ParseError as exc:
        raise SqlProjectError(f"{origin}: SQL does not parse: {exc}") from exc
    statements = [s for s in statements if s is not None]
    if len(statements) != 1 or not isinstance(statements[0], exp.Query):
        raise SqlProjectError(
            f"{origin}: must hold exactly one SELECT query (found {len(statements)} statements)"
        )
    tree = statements[0]
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    tables: set[str] = set()
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            continue  # range(...), read_csv(...) and other table functions
        if not table.db:
            if table.name in ctes:
                continue
            raise SqlProjectError(
                f"{origin}: table {table.name!r} has no schema; write it as schema.table "
                f"(e.g. eval.{table.name} or {TARGET_SCHEMA}.{table.name})"
            )
        tables.add(f"{table.db}.{table.name}")
    return frozenset(tables)


def _sql_description(sql: str) -> str:
    lines = []
    for line in sql.splitlines():
        stripped = line.strip()
        if not stripped.startswith("--"):
            break
        text = stripped[2:].strip()
        if not re.match(r"^(severity)\s*:", text):
            lines.append(text)
    return " ".join(line for line in lines if line)


def _python_model_parts(path: Path) -> tuple[str, str | None]:
    """Docstring and ``SOURCE`` of a Python model, read without importing it (keeps scipy out of loading)."""
    try:
        module = ast.parse(path.read_text("utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise SqlProjectError(f"{path}: Python model does not parse: {exc}") from exc
    docstring = ast.get_docstring(module) or ""
    source: str | None = None
    found = False
    for node in module.body:
        if not isinstance(node, ast.Assign):
            continue
        if any(isinstance(t, ast.Name) and t.id == "SOURCE" for t in node.targets):
            found = True
            value = node.value
            if isinstance(value, ast.Constant) and (value.value is None or isinstance(value.value, str)):
                source = value.value
            else:
                raise SqlProjectError(f"{path}: SOURCE must be a string literal (a SELECT) or None")
    has_model = any(isinstance(n, ast.FunctionDef) and n.name == "model" for n in module.body)
    if not found or not has_model:
        raise SqlProjectError(f"{path}: a Python model defines SOURCE = '<SELECT ...>' and def model(frame)")
    return " ".join(docstring.split()), source


def _digest(*texts: str) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:12]


def load_project(folder: Path | str | None = None) -> Project:
    """Discover models, tests and sources in ``folder`` and order models by their parsed dependencies."""
    root = Path(folder) if folder is not None else default_models_dir()
    if not root.is_dir():
        raise SqlProjectError(
            f"models folder {root} does not exist; pass --models-dir or set {MODELS_DIR_ENV}"
        )
    sources = _load_sources(root / "sources.yml")
    models: dict[str, Model] = {}
    for path in sorted([*root.glob("*.sql"), *root.glob("*.py")]):
        name = path.stem
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise SqlProjectError(f"{path}: model names are lower_snake_case (they become table names)")
        if name in models:
            raise SqlProjectError(
                f"{path}: model {name!r} is defined twice ({models[name].path.name} and {path.name})"
            )
        text = path.read_text("utf-8")
        if path.suffix == ".sql":
            reads = referenced_tables(text, str(path))
            models[name] = Model(name, path, "sql", text, _sql_description(text), reads, _digest(text))
        else:
            description, source = _python_model_parts(path)
            reads = referenced_tables(source, f"{path} (SOURCE)") if source else frozenset()
            models[name] = Model(name, path, "python", source, description, reads, _digest(text))
    for model in models.values():
        model.depends_on, model.sources = _split_reads(model.reads, models, sources, str(model.path))
        if model.name in model.depends_on:
            raise SqlProjectError(f"{model.path}: model {model.name!r} reads its own table")
    try:
        TopologicalSorter({m.name: sorted(m.depends_on) for m in models.values()}).prepare()
    except CycleError as exc:
        raise SqlProjectError(
            f"models in {root} depend on each other in a cycle: {' -> '.join(exc.args[1])}"
        ) from exc
    order = _stable_order(models)
    tests: dict[str, SqlTest] = {}
    for path in sorted((root / "tests").glob("*.sql")) if (root / "tests").is_dir() else []:
        text = path.read_text("utf-8")
        reads = referenced_tables(text, str(path))
        depends_on, _ = _split_reads(reads, models, sources, str(path))
        if not depends_on:
            raise SqlProjectError(f"{path}: a test must read at least one {TARGET_SCHEMA}.* model table")
        severity_match = re.search(r"^\s*--\s*severity\s*:\s*(\w+)", text, flags=re.MULTILINE | re.IGNORECASE)
        severity = severity_match.group(1).lower() if severity_match else "error"
        if severity not in ("error", "warn"):
            raise SqlProjectError(f"{path}: severity must be 'error' or 'warn', not {severity!r}")
        tests[path.stem] = SqlTest(
            path.stem,
            path,
            text,
            _sql_description(text),
            reads,
            "warn" if severity == "warn" else "error",
            depends_on,
        )
    return Project(root, models, tests, sources, order)


def _stable_order(models: dict[str, Model]) -> list[str]:
    """Dependency levels, alphabetical within a level: the same folder always builds in the same order."""
    order: list[str] = []
    placed: set[str] = set()
    remaining = dict(models)
    while remaining:
        ready = sorted(name for name, model in remaining.items() if model.depends_on <= placed)
        if not ready:  # unreachable after the cycle check above
            raise SqlProjectError(f"cannot order models {sorted(remaining)}")
        order.extend(ready)
        placed.update(ready)
        for name in ready:
            del remaining[name]
    return order


def _split_reads(
    reads: Iterable[str], models: dict[str, Model], sources: dict[str, Source], origin: str
) -> tuple[frozenset[str], frozenset[str]]:
    depends_on: set[str] = set()
    used_sources: set[str] = set()
    for table in reads:
        schema, name = table.split(".", 1)
        if schema == TARGET_SCHEMA:
            if name not in models:
                raise SqlProjectError(
                    f"{origin}: reads {table}, but there is no model {name}.sql or {name}.py in the folder"
                )
            depends_on.add(name)
        else:
            if table not in sources:
                raise SqlProjectError(
                    f"{origin}: reads {table}, which sources.yml does not declare; add it with its columns"
                )
            used_sources.add(table)
    return frozenset(depends_on), frozenset(used_sources)


def _load_sources(path: Path) -> dict[str, Source]:
    if not path.exists():
        return {}
    try:
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SqlProjectError(f"{path}: not valid YAML: {exc}") from exc
    result: dict[str, Source] = {}
    for table, spec in (raw.get("sources") or {}).items():
        if not re.fullmatch(r"[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*", str(table)):
            raise SqlProjectError(f"{path}: source {table!r} must be schema.table in lower_snake_case")
        columns = (spec or {}).get("columns") or {}
        if not columns:
            raise SqlProjectError(f"{path}: source {table} lists no columns")
        optional = frozenset(str(name) for name in (spec or {}).get("optional") or [])
        unknown = sorted(optional - set(map(str, columns)))
        if unknown:
            raise SqlProjectError(f"{path}: source {table} lists optional column(s) {unknown} it does not declare")
        result[str(table)] = Source(
            str(table), {str(k): str(v) for k, v in columns.items()}, (spec or {}).get("description", ""), optional
        )
    return result


# --------------------------------------------------------------------------------------------- running


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


CONTRACT_DOCS = "the README's 'The DuckDB contract' and dbt_like_sql/sources.yml"


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


# ------------------------------------------------------------------------------------------------ CLI


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
            from jpslm_assets.score_import import TABLE, ScoreImportError, load_scores

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
