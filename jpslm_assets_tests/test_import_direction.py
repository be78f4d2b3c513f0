"""Imports run one way: assets -> plain functions and resources -> settings (docs/architecture.md, "Layout").

Modules are parsed, not imported: an import in the wrong direction fails here even where it would import
fine, and imports inside functions or under ``TYPE_CHECKING`` count like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

from jpslm_assets.layering import BOTTOM_MODULES, PACKAGE, STAGES, is_plain_module, is_top_module

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "jpslm_assets"

# The top of the graph besides the stages' top modules (layering.TOP_MODULES): the modules that assemble them (definitions,
# sensors) and the entry points that load them.
ASSEMBLY_MODULES = frozenset(f"{PACKAGE}.{name}" for name in ("definitions", "run_recovery", "cli", "celery_app"))
# What a plain function may import from the package besides other plain functions: the bottom.
PLAIN_MAY_IMPORT = tuple(f"{PACKAGE}.{name}" for name in BOTTOM_MODULES)
DAGSTER_DEFINITIONS = ("asset", "multi_asset", "asset_check", "op", "job", "schedule", "sensor")


def _top(name: str) -> bool:
    """A stage's top module (or a name inside one) or an assembly module."""
    parts = name.split(".")
    return any(is_top_module(".".join(parts[:k])) for k in range(3, len(parts) + 1)) or _within(
        name, ASSEMBLY_MODULES
    )


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


def plain_refuses(name: str) -> bool:
    """A plain function imports neither Dagster, nor a resource, nor a stage's top; from the package
    only other plain functions and the bottom."""
    if name.split(".")[0] == "dagster" or name.startswith("dagster_"):
        return True
    if not _within(name, (PACKAGE,)) or name == PACKAGE:
        return False
    if _within(name, PLAIN_MAY_IMPORT):
        return False
    parts = name.split(".")
    # ``from jpslm_assets.qa import held_out`` names ``jpslm_assets.qa.held_out``; ``from jpslm_assets.qa.held_out
    # import X`` names ``jpslm_assets.qa.held_out.X``: the module is the longest plain prefix.
    plain = any(is_plain_module(".".join(parts[:k])) for k in range(2, len(parts) + 1))
    return not plain or _top(name)


def resources_refuse(name: str) -> bool:
    """A resource knows nothing of the assets that use it."""
    return name == PACKAGE or _top(name)


def _plain_modules() -> list[Path]:
    return [path for module, path in _modules(PACKAGE_DIR, PACKAGE_DIR.parent) if is_plain_module(module)]


def test_the_stage_packages_hold_plain_function_modules() -> None:
    """The layering below finds what it checks: every stage has its assets module, and most of the code
    is plain functions."""
    modules = [module for module, _ in _modules(PACKAGE_DIR, PACKAGE_DIR.parent)]
    assert {f"{PACKAGE}.{stage}.assets" for stage in STAGES} <= set(modules)
    assert len(_plain_modules()) >= 30


def test_plain_functions_import_no_resource_top_module_or_dagster() -> None:
    problems = [problem for problem in wrong_imports(PACKAGE_DIR, plain_refuses) if is_plain_module(problem.split(":")[0])]
    assert not problems, (
        "plain-function modules must not import resources, a stage's top or Dagster (move the shared "
        f"type down into jpslm_assets/common, or the call up into the asset): {problems}"
    )


def test_resources_import_no_top_module() -> None:
    problems = wrong_imports(PACKAGE_DIR / "resources", resources_refuse)
    assert not problems, f"jpslm_assets/resources must not import a stage's top (assets, checks, cli): {problems}"


def test_every_module_that_defines_assets_or_definitions_is_a_top_module() -> None:
    """Dagster definitions live only in the stages' top modules and the assembly modules, so the
    rules above refuse every one of them to plain functions and resources."""
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
    assert {f"{PACKAGE}.{stage}.assets" for stage in STAGES} <= defining, "the parse missed the stage modules"
    misplaced = sorted(module for module in defining if not _top(module))
    assert not misplaced, f"modules defining Dagster assets or definitions outside a top module: {misplaced}"


def test_the_check_names_a_planted_wrong_import(tmp_path: Path) -> None:
    stage = tmp_path / PACKAGE / "qa"
    stage.mkdir(parents=True)
    (stage / "__init__.py").write_text("")
    (stage / "ok.py").write_text(
        "from jpslm_assets.training import chat_format\nfrom .. import settings\nfrom . import templates\n"
        "from jpslm_assets.common.progress import Progress\n"
    )
    (stage / "bad.py").write_text(
        "import dagster as dg\n"
        "def f():\n    from jpslm_assets.resources.generation import GenerationBackend\n"
        "from jpslm_assets.training import assets\n"
        "from ..resources import trainer\n"
        "from jpslm_assets.export.assets import deploy\n"
        "from jpslm_assets import store\n"
    )
    assert wrong_imports(stage, plain_refuses, root=tmp_path) == [
        "jpslm_assets.qa.bad:1 imports dagster",
        "jpslm_assets.qa.bad:3 imports jpslm_assets.resources.generation.GenerationBackend",
        "jpslm_assets.qa.bad:4 imports jpslm_assets.training.assets",
        "jpslm_assets.qa.bad:5 imports jpslm_assets.resources.trainer",
        "jpslm_assets.qa.bad:6 imports jpslm_assets.export.assets.deploy",
        "jpslm_assets.qa.bad:7 imports jpslm_assets.store",
    ]
