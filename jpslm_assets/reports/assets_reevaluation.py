"""The re-evaluation schedule: on the profile's ``schedule.reevaluation_cron``, answers -> judge -> marts -> reports again for every adapter whose deployment is ``ok``, with the config that says which groups follow."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import dagster as dg
import polars as pl
import yaml
from pydantic import BaseModel, Field

from jpslm_assets import settings
from jpslm_assets.io_manager import table_of
from jpslm_assets.partitions import stage3_keys
from jpslm_assets.store import DuckDBStore, StoreError, read_tables


class ReevaluationConfig(BaseModel):
    per_format_tables: list[str] = Field(min_length=1)
    downstream_groups: list[str] = Field(default_factory=list)
    deployments_table: str
    exports_table: str


def load_reevaluation_config() -> ReevaluationConfig:
    text = (resources.files("jpslm_assets") / "data" / "reports.yaml").read_text("utf-8")
    return ReevaluationConfig(**yaml.safe_load(text)["reevaluation"])


@dataclass(frozen=True)
class ReevaluationTargets:
    """The assets one re-evaluation run may select: per-format evaluation assets, then downstream ones."""

    per_format: dict[str, list[dg.AssetKey]] = field(default_factory=dict)  # format -> keys
    downstream: list[dg.AssetKey] = field(default_factory=list)

    @property
    def all_keys(self) -> list[dg.AssetKey]:
        keys = [key for keys in self.per_format.values() for key in keys]
        return list(dict.fromkeys([*keys, *self.downstream]))

    def selection_for(self, formats: Iterable[str]) -> list[dg.AssetKey]:
        keys = [key for fmt in sorted(set(formats)) for key in self.per_format.get(fmt, [])]
        return list(dict.fromkeys([*keys, *self.downstream]))


def discover_reevaluation_targets(
    specs: Sequence[dg.AssetSpec], config: ReevaluationConfig, extra_downstream: Sequence[dg.AssetKey] = ()
) -> ReevaluationTargets:
    """Per-format assets by their table and ``fixed_columns.format``; downstream assets by group."""
    per_format: dict[str, list[dg.AssetKey]] = {}
    for spec in specs:
        metadata = spec.metadata or {}
        if table_of(metadata) in config.per_format_tables:
            fmt = (metadata.get("fixed_columns") or {}).get("format")
            if fmt is None:
                raise ValueError(
                    f"asset {spec.key.to_user_string()} writes {table_of(metadata)} without a fixed format; "
                    "pass table_metadata(..., fixed={'format': ...}) so the schedule can select it per format."
                )
            per_format.setdefault(str(fmt), []).append(spec.key)
    downstream = [spec.key for spec in specs if spec.group_name in config.downstream_groups]
    return ReevaluationTargets(per_format, list(dict.fromkeys([*downstream, *extra_downstream])))


@dataclass(frozen=True)
class DeployedModel:
    adapter: str  # the stage-3 partition key
    n: int
    formats: tuple[str, ...]


def deployed_models(
    deployments: pl.DataFrame | None,
    exports: pl.DataFrame | None,
    adapters: Sequence[str],
    formats: Iterable[str],
) -> tuple[list[DeployedModel], list[str]]:
    """(stage-3 adapter, n, formats) with an ``ok`` deployment, plus a note for each one left out and why.

    A deployment is left out when its adapter is not a stage-3 partition of the active profile, when no
    evaluation asset exists for its format, or when its format's GGUF export row says it did not succeed.
    """
    notes: list[str] = []
    if deployments is None or not deployments.height:
        return [], notes
    missing = [c for c in ("adapter", "n", "format", "status") if c not in deployments.columns]
    if missing:
        raise StoreError(
            f"serve.deployments lacks column(s) {missing}; re-materialize the deployment assets with the "
            "current code."
        )
    failed_exports: set[tuple[str, str]] = set()
    if exports is not None and exports.height and {"adapter", "format", "status"} <= set(exports.columns):
        for row in exports.filter(pl.col("status") != "ok").iter_rows(named=True):
            failed_exports.add((str(row["adapter"]), str(row["format"])))
    known_formats = set(formats)
    chosen: dict[tuple[str, int], set[str]] = {}
    for row in (
        deployments.filter(pl.col("status") == "ok").sort("adapter", "format").iter_rows(named=True)
    ):
        adapter, n, fmt = str(row["adapter"]), int(row["n"]), str(row["format"])
        where = f"deployment {adapter} (n={n}) {fmt}"
        if adapter not in adapters:
            notes.append(f"{where}: not a stage-3 adapter of the active profile ({', '.join(adapters)}), skipped")
        elif fmt not in known_formats:
            notes.append(f"{where}: no evaluation asset for format {fmt!r}, skipped")
        elif (adapter, fmt) in failed_exports:
            notes.append(f"{where}: its GGUF export is not ok, skipped")
        else:
            chosen.setdefault((adapter, n), set()).add(fmt)
    targets = [DeployedModel(a, n, tuple(sorted(f))) for (a, n), f in sorted(chosen.items())]
    return targets, notes


def validate_cron(cron: str) -> str:
    try:  # Dagster's own cron parser: a schedule with an invalid cron string cannot be defined
        dg.ScheduleDefinition(name="cron_check", cron_schedule=cron, job_name="cron_check")
        valid = True
    except dg.DagsterInvalidDefinitionError:
        valid = False
    if not valid:
        raise settings.SettingsError(
            f"schedule.reevaluation_cron {cron!r} is not a valid cron expression (five fields, e.g. "
            "'0 3 * * 1' for Mondays 03:00 UTC); fix the profile YAML or JPSLM_SCHEDULE__REEVALUATION_CRON."
        )
    return cron


def build_reevaluation_schedule(
    targets: ReevaluationTargets,
    cron: str,
    config: ReevaluationConfig,
    *,
    name: str = "reevaluation_schedule",
    job_name: str = "reevaluation_job",
) -> tuple[Any, dg.ScheduleDefinition]:
    """The re-evaluation job over ``targets`` and the schedule that launches one run per deployed (model, n)."""
    job = dg.define_asset_job(
        job_name,
        selection=targets.all_keys,
        description="Re-run answers -> judge -> marts -> reports for one deployed (model, n).",
        tags={"jpslm/stage": "reevaluation"},
    )

    @dg.schedule(
        name=name,
        cron_schedule=validate_cron(cron),
        job=job,
        description=(
            f"Cron {cron} (UTC; profile schedule.reevaluation_cron): re-evaluate every model whose deployment "
            f"in {config.deployments_table} is ok. Skips with a reason when none is deployed."
        ),
    )
    def _schedule(
        context: dg.ScheduleEvaluationContext, store: DuckDBStore
    ) -> dg.SkipReason | list[dg.RunRequest]:
        profile = settings.current_profile()
        frames = read_tables(store, [config.deployments_table, config.exports_table])
        deployed, notes = deployed_models(
            frames[config.deployments_table], frames[config.exports_table], stage3_keys(profile), targets.per_format
        )
        for note in notes:
            context.log.info(note)
        if not deployed:
            where = (
                f"{config.deployments_table} does not exist yet"
                if frames[config.deployments_table] is None
                else f"{config.deployments_table} has no row with status 'ok' for this profile"
            )
            detail = f" ({'; '.join(notes)})" if notes else ""
            return dg.SkipReason(
                f"no deployed model to re-evaluate: {where}{detail}. Materialize the `deployment` assets "
                "(export group) first."
            )
        tick = context.scheduled_execution_time or datetime.now(timezone.utc)
        return [
            dg.RunRequest(
                run_key=f"reevaluation-{tick:%Y%m%dT%H%M}-{target.adapter}-{target.n}",
                partition_key=target.adapter,
                asset_selection=targets.selection_for(target.formats),
                tags={"jpslm/trigger": name, "jpslm/formats": ",".join(target.formats)},
            )
            for target in deployed
        ]

    return job, _schedule
