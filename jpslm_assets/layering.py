"""Which module belongs to which layer (docs/architecture.md, "In five minutes").

- Stage packages (``kg``, ``qa``, ``training``, ``export``, ``judging``, ``marts``, ``reports``): each owns its
  top (``TOP_MODULES``: the Dagster definitions in ``assets.py`` / ``assets_<part>.py`` / ``checks.py``, and a
  command line in ``cli.py``) and its plain functions (every other module of the package).
- ``common``: types and functions more than one stage uses, at the bottom.
- ``resources``: one module per outside system.

Plain functions import other plain functions, ``common`` and ``BOTTOM_MODULES``; never Dagster, a
resource, the store or a stage's top. Resources import plain functions and the bottom, never a stage's top.
``code_versions`` follows exactly the plain-function modules when it derives an asset's version, so this one
predicate decides both what a test refuses and what a version rests on.
"""

from __future__ import annotations

PACKAGE = "jpslm_assets"
STAGES = ("kg", "qa", "training", "export", "judging", "marts", "reports")
# Modules of a stage package at the top of the graph: Dagster definitions (assets, checks, jobs, schedules)
# and the stage's command line; ``assets_<part>`` when one module would be too long.
TOP_MODULES = ("assets", "checks", "cli")
TOP_PREFIXES = ("assets_", "checks_")
COMMON = f"{PACKAGE}.common"
# Platform modules plain functions may use: the profile and environment, the model catalogue, content hashes
# and atomic files, and these rules. None of them imports Dagster.
BOTTOM_MODULES = ("settings", "catalogue", "artifacts", "layering")


def _parts(module: str) -> list[str]:
    return module.split(".")


def stage_of(module: str) -> str | None:
    """The stage a module belongs to, or None."""
    parts = _parts(module)
    return parts[1] if len(parts) >= 2 and parts[0] == PACKAGE and parts[1] in STAGES else None


def is_top_module(module: str) -> bool:
    """A stage's Dagster definitions or command line (``jpslm_assets.qa.assets``, ``jpslm_assets.marts.cli``)."""
    parts = _parts(module)
    if stage_of(module) is None or len(parts) != 3:
        return False
    return parts[2] in TOP_MODULES or parts[2].startswith(TOP_PREFIXES)


def is_plain_module(module: str) -> bool:
    """A plain-function module: any module of a stage package other than its top, or of ``common``."""
    parts = _parts(module)
    if module == COMMON or module.startswith(COMMON + "."):
        return True
    return stage_of(module) is not None and len(parts) >= 3 and not is_top_module(module)
