"""The code location: assembles each stage's definitions with the shared store, executor and automation.

Loading this module must stay fast (< 5 s) and must not import torch, transformers or llama_cpp: those are
imported inside asset bodies and resources' methods.
"""

from __future__ import annotations

import warnings

import dagster as dg

from jpslm_assets import automation, execution, run_recovery
from jpslm_assets.export import assets as export
from jpslm_assets.io_manager import DuckDBTableIOManager
from jpslm_assets.judging import assets as judging
from jpslm_assets.kg import assets as kg
from jpslm_assets.marts import assets as marts
from jpslm_assets.qa import assets as qa
from jpslm_assets.reports import assets as reports
from jpslm_assets.settings import current_profile
from jpslm_assets.store import default_store
from jpslm_assets.training import assets as training


def _with_automation(spec: dg.AssetSpec) -> dg.AssetSpec:
    if spec.automation_condition is not None:
        return spec
    return spec.replace_attributes(automation_condition=automation.on_change())


def with_automation(definitions: dg.Definitions) -> dg.Definitions:
    """``definitions`` with the project's automation condition on every asset that has none."""
    with warnings.catch_warnings():  # map_asset_specs is marked preview; its behaviour here is tested
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return definitions.map_asset_specs(func=_with_automation)


def build_definitions() -> dg.Definitions:
    store = default_store()
    shared = dg.Definitions(
        resources={"store": store, "io_manager": DuckDBTableIOManager(store=store)},
        executor=execution.default_executor(),
        sensors=[
            *automation.sensors(training_on=current_profile().automation.training),
            run_recovery.reaper_sensor(),
        ],
    )
    stages = [kg.defs, qa.defs, training.defs, export.defs, judging.defs, marts.defs, reports.defs]
    return with_automation(dg.Definitions.merge(shared, *stages))


defs = build_definitions()
