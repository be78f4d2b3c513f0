"""Imports run one way: assets -> plain functions and resources -> settings (docs/architecture.md, "Layout").

Modules are parsed, not imported: an import in the wrong direction fails here even where it would import
fine, and imports inside functions or under ``TYPE_CHECKING`` count like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "jpslm_assets"
PACKAGE = "jpslm_assets"

# The top of the graph: the stage modules (assets, checks, jobs, schedules), the modules that assemble
# them (definitions, sensors) and the entry points that load them.
STAGE_MODULES = ("kg", "qa", "training", "export", "judging", "marts", "reports")
TOP_MODULES = frozenset(
    f"{PACKAGE}.{name}" for name in (*STAGE_MODULES, "definitions", "run_recovery", "cli", "celery_app")
)
# What a plain function may import from the package: other plain functions and the bottom (settings and the
# model catalogue, which are data).
DOMAIN_MAY_IMPORT = (f"{PACKAGE}.domain", f"{PACKAGE}.settings", f"{PACKAGE}.catalogue")
DAGSTER_DEFINITIONS = ("asset", "multi_asset", "asset_check", "op", "job", "schedule", "sensor")


def _modules(folder: Path, root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module under ``folder``; names are relative to ``root``."""
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported_names(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything ``path`` imports; ``from a import b`` gives ``a.b``, since ``b`` may
    be a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text("utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base


def _within(name: str, prefixes: tuple[str, ...] | frozenset[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def wrong_imports(folder: Path, refused: Callable[[str], bool], root: Path = PACKAGE_DIR.parent) -> list[str]:
    """``module:line imports name`` for every import under ``folder`` that ``refused`` rejects."""
    found = [
        (module, line, name)
        for module, path in _modules(folder, root)
        for line, name in imported_names(module, path)
        if refused(name)
    ]
    return [f"{module}:{line} imports {name}" for module, line, name in sorted(found)]


def domain_refuses(name: str) -> bool:
    """A plain function imports neither Dagster nor anything of the package above the bottom."""
    if name.split(".")[0] == "dagster" or name.startswith("dagster_"):
        return True
    return _within(name, (PACKAGE,)) and name != PACKAGE and not _within(name, DOMAIN_MAY_IMPORT)


def resources_refuse(name: str) -> bool:
    """A resource knows nothing of the assets that use it."""
    return name == PACKAGE or _within(name, TOP_MODULES)


def test_plain_functions_import_no_resource_asset_module_or_dagster() -> None:
    problems = wrong_imports(PACKAGE_DIR / "domain", domain_refuses)
    assert not problems, (
        "jpslm_assets/domain must not import resources, asset modules or Dagster (move the shared type down "
        f"into jpslm_assets/domain, or the call up into the asset): {problems}"
    )


def test_resources_import_no_asset_module() -> None:
    problems = wrong_imports(PACKAGE_DIR / "resources", resources_refuse)
    assert not problems, f"jpslm_assets/resources must not import asset modules: {problems}"


def test_every_module_that_defines_assets_or_definitions_is_counted_as_the_top() -> None:
    """The list above stays complete: a new stage module is refused to plain functions and resources too."""
    defining = set()
    for module, path in _modules(PACKAGE_DIR, PACKAGE_DIR.parent):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            called = node.func if isinstance(node, ast.Call) else node
            if not (isinstance(called, ast.Attribute) and isinstance(called.value, ast.Name)):
                continue
            if called.value.id == "dg" and (
                called.attr in DAGSTER_DEFINITIONS or (called.attr == "Definitions" and called is not node)
            ):
                defining.add(module)
    assert {f"{PACKAGE}.{name}" for name in STAGE_MODULES} <= defining, "the parse missed the stage modules"
    missing = sorted(defining - TOP_MODULES)
    assert not missing, f"modules defining Dagster assets or definitions, missing from TOP_MODULES: {missing}"


def test_the_check_names_a_planted_wrong_import(tmp_path: Path) -> None:
    domain = tmp_path / PACKAGE / "domain"
    domain.mkdir(parents=True)
    (domain / "__init__.py").write_text("")
    (domain / "ok.py").write_text("from jpslm_assets.domain import chat_format\nfrom .. import settings\n")
    (domain / "bad.py").write_text(
        "import dagster as dg\n"
        "def f():\n    from jpslm_assets.resources.generation import GenerationBackend\n"
        "from jpslm_assets import qa\n"
        "from ..resources import trainer\n"
    )
    assert wrong_imports(domain, domain_refuses, root=tmp_path) == [
        "jpslm_assets.domain.bad:1 imports dagster",
        "jpslm_assets.domain.bad:3 imports jpslm_assets.resources.generation.GenerationBackend",
        "jpslm_assets.domain.bad:4 imports jpslm_assets.qa",
        "jpslm_assets.domain.bad:5 imports jpslm_assets.resources.trainer",
    ]
