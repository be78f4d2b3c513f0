"""Code versions derived from the code that computes an asset, so they change exactly when it does.

A hand-set ``code_version="1"`` is only as good as the memory of whoever edits the code. Here an asset's
version is a hash of the source of:

- its compute function;
- every function or class of its own module it uses, followed transitively (``train_adapter`` behind
  ``stage1_lora_adapter``);
- every function or class of a plain-function module (``layering.is_plain_module``: a stage package's modules
  other than its definitions, and ``common``) it uses, followed the same way inside that module (a module used
  only as a value counts whole).

The hash covers each piece's name and source, not the module it lives in: moving a function to another module
leaves every version alone; changing what it does, or which function it calls, does not.

Resources are not part of it: they arrive as parameters (the trainer, the graph store, the generation
backends) and decide how fast or where a value is computed, not which value. A change in them that changes
the numbers is named in ``versioned(...)``'s extra strings of the assets it affects (a reviewed bump).

``versioned(assets_def)`` replaces the code version of every spec of a decorated asset with that hash; the
hash does not depend on the Python process (sha256 of the sources), so an unchanged checkout keeps every
asset fresh across runs, the UI and the daemon.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any

import dagster as dg

from jpslm_assets.layering import is_plain_module


def _names(code: types.CodeType) -> set[str]:
    """Global and attribute names a code object uses, nested code (comprehensions, lambdas) included."""
    names: set[str] = set()
    stack = [code]
    while stack:
        current = stack.pop()
        names |= set(current.co_names)
        stack += [const for const in current.co_consts if isinstance(const, types.CodeType)]
    return names


@functools.cache
def _top_level_classes(module: types.ModuleType) -> dict[str, str]:
    """Source of each top-level class of a module, from one parse of its file."""
    text = inspect.getsource(module)
    return {
        node.name: ast.get_source_segment(text, node) or ""
        for node in ast.parse(text).body
        if isinstance(node, ast.ClassDef)
    }


@functools.cache
def _source(target: Any) -> str:
    """``inspect.getsource``, once per object; classes come from one parse of their module (many assets share
    helpers, and ``inspect`` parses the whole file again for every class it looks up)."""
    if inspect.isclass(target):
        module = inspect.getmodule(target)
        found = _top_level_classes(module).get(target.__qualname__) if module is not None else None
        if found:
            return found
    return inspect.getsource(target)


def dependency_sources(
    function: Callable[..., Any], follows: Callable[[str], bool] = is_plain_module
) -> dict[str, str]:
    """``{"module:qualified name": source}`` of everything ``function``'s version rests on (see the module
    docstring); a module counted whole is ``"module:"``."""
    sources: dict[str, str] = {}
    pending: list[Any] = [inspect.unwrap(function)]
    home = pending[0].__module__

    def ours(target: Any) -> bool:
        module = getattr(target, "__module__", "") or ""
        return follows(module) or module == home

    while pending:
        current = pending.pop()
        key = f"{current.__module__}:{current.__qualname__}"
        if key in sources:
            continue
        sources[key] = _source(current)
        if inspect.isclass(current):
            continue
        names = _names(current.__code__)
        scope = current.__globals__
        for name in sorted(names):
            target = scope.get(name)
            if isinstance(target, types.ModuleType) and follows(target.__name__):
                # ``module.function``: the functions and classes of that module this code names.
                used = [
                    member
                    for attribute in sorted(names)
                    if (inspect.isfunction(member := getattr(target, attribute, None)) or inspect.isclass(member))
                    and member.__module__ == target.__name__
                ]
                if used:
                    pending += used
                else:
                    sources.setdefault(f"{target.__name__}:", _source(target))
            elif (inspect.isfunction(target) or inspect.isclass(target)) and ours(target):
                pending.append(target)
    return sources


def _name_without_module(key: str) -> str:
    """``"jpslm_assets.training.assets:train_adapter"`` -> ``train_adapter``; a module counted whole keeps
    its last name, so a move between modules changes no version."""
    module, _, qualname = key.partition(":")
    return qualname or module.rpartition(".")[2]


def source_version(
    function: Callable[..., Any], *extra: str, follows: Callable[[str], bool] = is_plain_module
) -> str:
    """12 hex digits of sha256 over the sources ``function`` rests on, plus ``extra`` strings."""
    digest = hashlib.sha256()
    pieces = sorted(
        (_name_without_module(key), source) for key, source in dependency_sources(function, follows).items()
    )
    for name, source in pieces:
        digest.update(name.encode() + b"\0" + source.encode() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:12]


def versioned(*extra: str) -> Callable[[dg.AssetsDefinition], dg.AssetsDefinition]:
    """Decorator above ``@dg.asset``: the asset's code version becomes ``source_version`` of its function."""

    def apply(assets_def: dg.AssetsDefinition) -> dg.AssetsDefinition:
        version = source_version(assets_def.op.compute_fn.decorated_fn, *extra)  # type: ignore[union-attr]
        return assets_def.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))

    return apply


def versions_of(definitions: Iterable[dg.AssetsDefinition]) -> dict[str, str | None]:
    """Asset key -> code version, for reports and tests."""
    return {
        spec.key.to_user_string(): spec.code_version for assets in definitions for spec in assets.specs
    }
