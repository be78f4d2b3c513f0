"""The code location: assembles each stage's definitions with the shared store and executor.

Loading this module must stay fast (< 5 s) and must not import torch, transformers or llama_cpp: those are
imported inside asset bodies and resources' methods.
"""

from __future__ import annotations

import dagster as dg

from jpslm_assets import execution, export, judging, kg, marts, qa, reports, training
from jpslm_assets.store import DuckDBTableIOManager, default_store


def build_definitions() -> dg.Definitions:
    store = default_store()
    shared = dg.Definitions(
        resources={"store": store, "io_manager": DuckDBTableIOManager(store=store)},
        executor=execution.default_executor(),
    )
    stages = [kg.defs, qa.defs, training.defs, export.defs, judging.defs, marts.defs, reports.defs]
    return dg.Definitions.merge(shared, *stages)


defs = build_definitions()
