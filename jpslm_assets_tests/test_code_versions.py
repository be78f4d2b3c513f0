"""Code versions follow the code that computes each asset (jpslm_assets/code_versions.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import dagster as dg

from jpslm_assets.code_versions import versions_of

PACKAGE = Path(__file__).resolve().parents[1] / "jpslm_assets"


def test_every_asset_has_a_derived_code_version_and_none_is_set_by_hand() -> None:
    from jpslm_assets.definitions import defs

    assets = [item for item in defs.assets or [] if isinstance(item, dg.AssetsDefinition)]
    versions = versions_of(assets)
    assert len(versions) > 50
    assert all(isinstance(v, str) and len(v) == 12 and int(v, 16) >= 0 for v in versions.values()), versions
    hand_set = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "code_version" and isinstance(node.value, ast.Constant):
                hand_set.append(f"{path.name}:{node.value.lineno}")
    assert not hand_set, f"literal code versions no change would ever bump: {hand_set}"
    # Another process computes the same versions from the same checkout (nothing stale after a restart).
    script = (
        "import json; from jpslm_assets.definitions import defs; from jpslm_assets.code_versions import versions_of;"
        "print(json.dumps(versions_of([a for a in defs.assets if hasattr(a, 'specs')])))"
    )
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == versions


TOY_DOMAIN = '''
def double(x):
    return _twice(x)


def _twice(x):
    return 2 * x


def unrelated():
    return "not used by the asset"
'''

TOY_ASSETS = '''
import dagster as dg
from toy.domain import calc
from jpslm_assets.code_versions import source_version


def _helper(x):
    return calc.double(x) + 1


@dg.asset
def toy_asset():
    return _helper(20)


def version():
    return source_version(toy_asset.op.compute_fn.decorated_fn, follows=lambda module: module.startswith("toy.domain"))
'''


def _toy_version(root: Path, domain: str, assets: str = TOY_ASSETS, module: str = "calc") -> str:
    (root / "toy" / "domain").mkdir(parents=True, exist_ok=True)
    (root / "toy" / "__init__.py").write_text("")
    (root / "toy" / "domain" / "__init__.py").write_text("")
    (root / "toy" / "domain" / f"{module}.py").write_text(domain)
    (root / "toy" / "assets.py").write_text(assets)
    completed = subprocess.run(
        [sys.executable, "-c", "from toy import assets; print(assets.version())"],
        cwd=root, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return completed.stdout.strip()


def test_the_version_changes_with_the_code_an_asset_runs_and_only_with_it(tmp_path: Path) -> None:
    base = _toy_version(tmp_path / "a", TOY_DOMAIN)
    assert len(base) == 12
    assert _toy_version(tmp_path / "b", TOY_DOMAIN) == base, "same code, same version"
    # A helper two calls away inside the domain module changes what is computed: a new version.
    assert _toy_version(tmp_path / "c", TOY_DOMAIN.replace("2 * x", "x + x + 0")) != base
    # A same-module helper of the asset changes: a new version.
    assert _toy_version(tmp_path / "d", TOY_DOMAIN, TOY_ASSETS.replace("+ 1", "+ 2")) != base
    # A function of the domain module the asset never reaches: the version stays.
    assert _toy_version(tmp_path / "e", TOY_DOMAIN.replace("not used by the asset", "still unused")) == base
    # The same functions moved to a module of another name: the version stays (a layout change retrains
    # nothing).
    moved = TOY_ASSETS.replace("from toy.domain import calc", "from toy.domain import arithmetic as calc")
    assert _toy_version(tmp_path / "f", TOY_DOMAIN, moved, module="arithmetic") == base
    # ... but a helper renamed is a change in what the asset runs.
    renamed = TOY_DOMAIN.replace("_twice", "_two_times")
    assert _toy_version(tmp_path / "g", renamed) != base
