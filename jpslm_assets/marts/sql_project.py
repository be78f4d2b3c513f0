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

Running the models and tests against DuckDB is ``sql_runs``; the command line is ``marts.cli``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Literal

import sqlglot
import yaml
from sqlglot import exp

TARGET_SCHEMA = "marts"
MODELS_DIR_ENV = "JPSLM_SQL_DIR"
DIALECT = "duckdb"


class SqlProjectError(ValueError):
    """The models folder is inconsistent (bad SQL, unknown reference, cycle); the message names the file."""


def default_models_dir() -> Path:
    """``$JPSLM_SQL_DIR``, else ``dbt_like_sql/`` next to the package (the repository root)."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "dbt_like_sql"


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


CONTRACT_DOCS = "the README's 'The DuckDB contract' and dbt_like_sql/sources.yml"
