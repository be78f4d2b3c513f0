"""Declarative automation: one condition for every asset, two sensors that evaluate it.

The condition (``on_change``) requests an asset partition when it is missing for the first time, when its
code version changed, or when the data version of something it reads changed; never while it or an
upstream is in progress, missing, or about to be requested in the same evaluation. Dagster's automation page shows, per evaluation, which of these held.

Two automation condition sensors split the assets by what they cost:
- ``jpslm_table_automation`` (running by default): tables computed from other tables in seconds, the
  scale curve and n*, the marts, figures and the report. A re-materialized test NLL or judge score
  updates them without anyone asking.
- ``jpslm_training_automation`` (stopped by default): everything that trains, scores with a model,
  exports, answers or judges, and the data they start from (knowledge graph, QA, base models). On the
  paper profile these hold a GPU for hours. Switch it on in the UI (Automation page) or start the UI with
  ``JPSLM_AUTOMATION__TRAINING=true``; then a new n* from stage 1 re-trains stage 2 by itself, and so on.

After ``jpslm demo`` nothing is missing and no data version has moved, so neither sensor requests a run.
"""

from __future__ import annotations

import dagster as dg

TABLE_SENSOR = "jpslm_table_automation"
TRAINING_SENSOR = "jpslm_training_automation"
# Assets evaluated by the table sensor; every other asset with a condition belongs to the training sensor.
TABLE_GROUPS = ("marts", "reports")
TABLE_ASSETS = ("stage1_scale_curve", "optimal_scale")


def on_change() -> dg.AutomationCondition:
    """Missing for the first time, new code, or an upstream's data version changed, since last handled."""
    changed: dg.AutomationCondition = (
        dg.AutomationCondition.missing().newly_true().with_label("newly missing")
        | dg.AutomationCondition.code_version_changed().with_label("code version changed")
        | dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()).with_label(
            "upstream data version changed"
        )
    )
    return (
        changed.since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        # An upstream requested in the same tick runs first; this asset follows once its data changes.
        & ~dg.AutomationCondition.any_deps_match(dg.AutomationCondition.will_be_requested())
        & ~dg.AutomationCondition.in_progress()
    ).with_label("on_change")


def table_selection() -> dg.AssetSelection:
    return dg.AssetSelection.groups(*TABLE_GROUPS) | dg.AssetSelection.assets(*TABLE_ASSETS)


def sensors(training_on: bool) -> list[dg.AutomationConditionSensorDefinition]:
    """The two automation sensors; ``training_on`` is the profile's ``automation.training`` switch."""
    tables = table_selection()
    return [
        dg.AutomationConditionSensorDefinition(
            TABLE_SENSOR,
            target=tables,
            default_status=dg.DefaultSensorStatus.RUNNING,
            description="Keeps the scale curve, n*, marts, figures and report up to date with their inputs.",
        ),
        dg.AutomationConditionSensorDefinition(
            TRAINING_SENSOR,
            target=dg.AssetSelection.all() - tables,
            default_status=dg.DefaultSensorStatus.RUNNING if training_on else dg.DefaultSensorStatus.STOPPED,
            description=(
                "Trains, scores, exports, answers and judges when their inputs change (a new n* re-trains stage "
                "2). Off unless switched on here or with JPSLM_AUTOMATION__TRAINING=true."
            ),
        ),
    ]
