"""Reports stage: the paper's figures as assets, one HTML evaluation report per run, and the re-evaluation
schedule.

- ``figure_<key>`` (one per entry of ``data/reports.yaml``): reads its source tables from DuckDB, renders a
  PNG (placeholder image when a table is empty or missing), stores it content-addressed under
  ``<artifacts>/figures`` and shows it in the asset's metadata, so the Dagster UI displays it.
- ``evaluation_report``: one self-contained HTML file per run under ``<artifacts>/reports``, embedding every
  figure and the score tables; ``reports.report_history`` keeps one row per report written.
- ``reevaluation_schedule``: on the profile's ``schedule.reevaluation_cron``, re-runs answers -> judge ->
  marts -> reports for every (model, n) whose deployment is ``ok``; skips with a reason when none is.

Upstream assets are found by the table they write (their ``table`` definition metadata), so this module
depends on the storage contract in docs/architecture.md, not on other stages' function names.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import yaml
from pydantic import BaseModel, Field

from jpslm_assets import export, judging, kg, marts, qa, settings, training
from jpslm_assets.artifacts import artifact_record, frame_version
from jpslm_assets.code_versions import versioned
from jpslm_assets.domain import figure_catalogue, figures_export
from jpslm_assets.domain import figures as figure_lib
from jpslm_assets.domain import report_document as report_lib
from jpslm_assets.domain.progress import StepTimings
from jpslm_assets.io_manager import table_metadata, table_of
from jpslm_assets.partitions import stage3_keys
from jpslm_assets.store import DuckDBStore, StoreError

GROUP = "reports"
FIGURES_TABLE = "reports.figures"
REPORTS_TABLE = "reports.evaluation_reports"
REPORT_HISTORY_TABLE = "reports.report_history"


class ReevaluationConfig(BaseModel):
    per_format_tables: list[str] = Field(min_length=1)
    downstream_groups: list[str] = Field(default_factory=list)
    deployments_table: str
    exports_table: str


def load_reevaluation_config() -> ReevaluationConfig:
    text = (resources.files("jpslm_assets") / "data" / "reports.yaml").read_text("utf-8")
    return ReevaluationConfig(**yaml.safe_load(text)["reevaluation"])


# ------------------------------------------------------------------------------------ reading the contract


def asset_specs(definitions: Iterable[dg.Definitions]) -> list[dg.AssetSpec]:
    """Every asset spec the given stage definitions declare (multi-assets contribute each spec)."""
    specs: list[dg.AssetSpec] = []
    for defs in definitions:
        for item in defs.assets or []:
            if isinstance(item, dg.AssetsDefinition):
                specs.extend(item.specs)
            elif isinstance(item, dg.AssetSpec):
                specs.append(item)
    return specs


def writers_of(
    table: str, specs: Sequence[dg.AssetSpec], secondary: Mapping[str, Sequence[str]] | None = None
) -> list[dg.AssetKey]:
    """Keys of the assets that write ``table``: by their ``table`` metadata, by the secondary-table list
    in reports.yaml, else by a key named like the table."""
    by_metadata = [spec.key for spec in specs if table_of(spec.metadata) == table]
    if by_metadata:
        return by_metadata
    known = {spec.key for spec in specs}
    listed = [dg.AssetKey.from_user_string(key) for key in (secondary or {}).get(table, [])]
    if any(key in known for key in listed):
        return [key for key in listed if key in known]
    schema, name = table.split(".")
    names = {name, f"{schema}_{name}", table}
    return [
        spec.key for spec in specs if spec.key.to_user_string() in names or spec.key.path == [schema, name]
    ]


def read_tables(store: DuckDBStore, tables: Sequence[str]) -> dict[str, pl.DataFrame | None]:
    """Whole tables by name; None where a table (or the DuckDB file) does not exist yet."""
    frames: dict[str, pl.DataFrame | None] = {}
    for table in tables:
        frames[table] = store.read_slices(table, [{}]) if store.table_exists(table) else None
    return frames


def _stage_specs() -> list[dg.AssetSpec]:
    return asset_specs([kg.defs, qa.defs, training.defs, export.defs, judging.defs, marts.defs])


# ------------------------------------------------------------------------------------------ figure assets


def _spec_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:10]


def figure_file(key: str, png: bytes) -> Path:
    """Content-addressed PNG path: a re-render never overwrites a file an older report points at."""
    digest = hashlib.sha256(png).hexdigest()[:16]
    return settings.artifact_dir() / "figures" / f"{key}-{digest}.png"


def figure_row(result: figure_lib.FigureResult, run_id: str, path: Path) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "figure": result.key,
                "title": result.title,
                "status": "placeholder" if result.is_placeholder else "ok",
                "placeholder_reason": result.placeholder_reason,
                "source_rows": json.dumps(result.source_rows, sort_keys=True),
                "stats": json.dumps(result.stats, sort_keys=True, ensure_ascii=False, default=str),
                "width_px": result.width_px,
                "height_px": result.height_px,
                "run_id": run_id,
                "rendered_at": datetime.now(timezone.utc),
                **artifact_record(path),
            }
        ],
        schema_overrides={"placeholder_reason": pl.String},
    )


def figure_metadata(
    result: figure_lib.FigureResult, spec: figure_lib.FigureSpec, path: Path, timings: StepTimings
) -> dict[str, Any]:
    image = report_lib.markdown_image(result.png, spec.title)
    text = f"{image}\n\n{spec.caption}"
    if result.placeholder_reason:
        text = f"**No data yet.** {result.placeholder_reason}\n\n{text}"
    metadata: dict[str, Any] = {
        "figure": dg.MetadataValue.md(text),
        "status": "placeholder" if result.is_placeholder else "ok",
        "source_rows": dg.MetadataValue.json(result.source_rows),
        "png_path": dg.MetadataValue.path(str(path)),
        "png_bytes": len(result.png),
        **timings.as_metadata(),
    }
    if result.stats:
        metadata["stats"] = dg.MetadataValue.json(json.loads(json.dumps(result.stats, default=str)))
    return metadata


def build_figure_asset(spec: figure_lib.FigureSpec, upstream: Sequence[dg.AssetKey]) -> dg.AssetsDefinition:
    """One figure as an asset: read the spec's tables, render, store the PNG, attach it as metadata."""

    @versioned(_spec_digest(spec.model_dump()))  # the code that draws it and the spec it draws
    @dg.asset(
        name=f"figure_{spec.key}",
        group_name=GROUP,
        kinds={"matplotlib", "duckdb"},
        deps=list(upstream),
        description=f"{spec.title}. {spec.caption} Source tables: {', '.join(spec.tables)}.",
        metadata=table_metadata(FIGURES_TABLE, fixed={"figure": spec.key}),
    )
    def _figure(context: dg.AssetExecutionContext, store: DuckDBStore) -> dg.Output[pl.DataFrame]:
        timings = StepTimings()
        with timings.step("read tables"):
            frames = read_tables(store, spec.tables)
        with timings.step("render"):
            result = figure_catalogue.render_figure(spec.key, frames)
        with timings.step("write png"):
            path = report_lib.write_atomically(figure_file(spec.key, result.png), result.png)
        if result.is_placeholder:
            context.log.warning(f"figure {spec.key}: placeholder — {result.placeholder_reason}")
        else:
            context.log.info(
                f"figure {spec.key}: {result.width_px}x{result.height_px} px from {result.source_rows}"
            )
        frame = figure_row(result, context.run_id, path)
        return dg.Output(
            frame,
            data_version=dg.DataVersion(frame_version(frame.drop("rendered_at", "run_id"))),
            metadata=figure_metadata(result, spec, path, timings),
        )

    return _figure


# ------------------------------------------------------------------------------------------- HTML report

SUMMARY_COLUMNS = [
    "model", "n", "format", "questions", "avg_score", "ci_low", "ci_high", "perfect_rate", "score0_count",
    "avg_chars", "sec_per_question", "size_gb",
]  # fmt: skip


def validity_lead(validity: pl.DataFrame | None) -> str:
    """The report's first line: each judge's validity verdict, a judge without signal named first."""
    if validity is None or not validity.height:
        return (
            "判定者の妥当性 (judge validity): not measured. Materialize judge_controls and the marts; until then "
            "nothing shows whether the scores below measure correctness."
        )

    def interval(row: dict[str, Any]) -> str:
        if row["separation"] is None:
            return "no paired controls"
        if row["separation_ci_low"] is None:
            return f"separation {row['separation']:.2f}"
        return f"separation {row['separation']:.2f} [{row['separation_ci_low']:.2f}, {row['separation_ci_high']:.2f}]"

    rows = list(validity.sort("judge").iter_rows(named=True))
    silent = [row for row in rows if row["verdict"] == "no signal"]
    if silent:
        names = "; ".join(f"{row['judge']} ({interval(row)})" for row in silent)
        return (
            f"警告 (warning): no signal from judge {names}: it scores an unrelated reference about as high as the "
            "right one, so its scores below say nothing about the answers."
        )
    return "判定者の妥当性 (judge validity): " + "; ".join(
        f"{row['judge']}: {row['verdict']} ({interval(row)})" for row in rows
    )


def summary_table(frame: pl.DataFrame | None) -> report_lib.ReportTable:
    title = "スコア要約 (marts.score_summary)"
    if frame is None or not frame.height:
        return report_lib.ReportTable(
            title,
            SUMMARY_COLUMNS,
            [],
            empty_message="marts.score_summary is empty: run the judging stage and marts.",
        )
    ordered = frame.sort(figure_lib.series_columns(frame))
    judged = "judge" in frame.columns and frame["judge"].n_unique() > 1
    columns = [*SUMMARY_COLUMNS[:3], "judge", *SUMMARY_COLUMNS[3:]] if judged else list(SUMMARY_COLUMNS)
    if "judge_verdict" in frame.columns:
        columns.insert(columns.index("avg_score") + 3, "judge_verdict")  # beside the average and its interval
    return report_lib.frame_table(
        ordered,
        columns,
        title,
        note="ci_low / ci_high: confidence interval of the average score as computed by the marts; "
        "perfect_rate: share of 3s among parsed judgements.",
        digits={"avg_chars": 0, "sec_per_question": 2, "size_gb": 2},
    )


def quantization_table(frame: pl.DataFrame | None) -> report_lib.ReportTable:
    title = "F16 と Q4_K_M (marts.quantization_effect)"
    if frame is None or not frame.height:
        return report_lib.ReportTable(
            title,
            ["model", "n"],
            [],
            empty_message="marts.quantization_effect is empty: evaluate both formats of a model first.",
        )
    content = figures_export.quantization_table(frame)
    return report_lib.ReportTable(
        title,
        content.headers,
        content.rows,
        note="p値: paired test over the questions both formats answered; Δ 区間: its paired bootstrap "
        "interval where the mart has one; 速度比 = F16 seconds / Q4 seconds per question.",
    )


def provenance_rows(store: DuckDBStore, tables: Sequence[str]) -> list[tuple[str, str]]:
    """Newest materialization (asset, partition count, data version, time) of each source table."""
    if not store.table_exists("lineage.materializations"):
        return []
    latest = store.query(
        "SELECT table_name, asset_key, count(DISTINCT partition_key) AS partitions, "
        "arg_max(data_version, materialized_at) AS data_version, max(materialized_at) AS at "
        "FROM lineage.materializations WHERE table_name IN (SELECT unnest(?)) "
        "GROUP BY table_name, asset_key ORDER BY table_name, asset_key",
        [list(tables)],
    )
    rows = []
    for row in latest.iter_rows(named=True):
        scope = (
            f"{row['partitions']} partition(s), newest data version {row['data_version']}"
            if row["partitions"]
            else f"data version {row['data_version']}"
        )
        rows.append(
            (f"{row['table_name']} ← {row['asset_key']}", f"{row['at']:%Y-%m-%d %H:%M:%S} UTC, {scope}")
        )
    return rows


def load_figure_png(row: Mapping[str, Any], figure_key: str) -> bytes:
    """The PNG a figure asset recorded, checked against its sha256 so the report embeds what was stored."""
    path = Path(row["artifact_path"])
    if not path.is_file():
        raise report_lib.ReportError(
            f"figure {figure_key}: file {path} recorded in {FIGURES_TABLE} is missing; re-materialize "
            f"figure_{figure_key}."
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != row["artifact_sha256"]:
        raise report_lib.ReportError(
            f"figure {figure_key}: file {path} no longer matches the sha256 recorded in {FIGURES_TABLE}; "
            f"re-materialize figure_{figure_key}."
        )
    return data


def build_report_asset(figure_keys: Sequence[str]) -> dg.AssetsDefinition:
    catalogue = figure_catalogue.load_figure_catalogue()
    ins = {f"figure_{key}": dg.AssetIn(key=dg.AssetKey(f"figure_{key}")) for key in figure_keys}

    @versioned()
    @dg.asset(
        name="evaluation_report",
        group_name=GROUP,
        kinds={"html", "duckdb"},
        ins=ins,
        description=(
            "One self-contained HTML report per run (figures embedded as PNG, score tables, provenance of "
            "the source tables), written under <artifacts>/reports; reports.report_history lists them all."
        ),
        metadata=table_metadata(REPORTS_TABLE),
    )
    def evaluation_report(
        context: dg.AssetExecutionContext, store: DuckDBStore, **figure_rows: pl.DataFrame
    ) -> dg.Output[pl.DataFrame]:
        timings = StepTimings()
        report_figures = []
        with timings.step("collect figures"):
            for key in figure_keys:
                rows = figure_rows[f"figure_{key}"]
                if not rows.height:
                    raise report_lib.ReportError(
                        f"{FIGURES_TABLE} has no row for figure {key}; materialize figure_{key} first."
                    )
                row = rows.row(0, named=True)
                spec = catalogue.figures[key]
                report_figures.append(
                    report_lib.ReportFigure(
                        key, spec.title, spec.caption, load_figure_png(row, key), row["placeholder_reason"]
                    )
                )
        with timings.step("read tables"):
            tables = read_tables(store, ["marts.score_summary", "marts.quantization_effect", "marts.judge_validity"])
            source_tables = sorted({t for spec in catalogue.figures.values() for t in spec.tables})
            provenance = provenance_rows(store, source_tables)
        created = datetime.now(timezone.utc)
        profile = settings.current_profile()
        document = report_lib.ReportDocument(
            title=f"評価レポート (evaluation report) — {profile.name}",
            created_at=created,
            run_id=context.run_id,
            profile=f"{profile.name}: models {', '.join(profile.models)}; n grid {profile.n_grid}",
            figures=report_figures,
            tables=[
                summary_table(tables["marts.score_summary"]),
                quantization_table(tables["marts.quantization_effect"]),
            ],
            provenance=provenance,
            font_path=figure_lib.japanese_font_path(),
            lead=validity_lead(tables["marts.judge_validity"]),
        )
        with timings.step("write html"):
            path = report_lib.write_report(document, settings.artifact_dir() / "reports")
        frame = pl.DataFrame(
            [
                {
                    "run_id": context.run_id,
                    "created_at": created,
                    "profile": profile.name,
                    "title": document.title,
                    "figures": len(report_figures),
                    "placeholders": document.placeholders,
                    **artifact_record(path),
                }
            ]
        )
        store.write_slice(REPORT_HISTORY_TABLE, frame, {"run_id": context.run_id})
        context.log.info(f"report written to {path} ({frame['artifact_bytes'][0]} bytes)")
        summary_md = report_lib.markdown_table(summary_table(tables["marts.score_summary"]))
        return dg.Output(
            frame,
            data_version=dg.DataVersion(frame["artifact_sha256"][0][:24]),
            metadata={
                "report_path": dg.MetadataValue.path(str(path)),
                "report_bytes": int(frame["artifact_bytes"][0]),
                "figures": len(report_figures),
                "placeholders": document.placeholders,
                "judge_validity": document.lead or "",
                "score_summary": dg.MetadataValue.md(summary_md),
                **timings.as_metadata(),
            },
        )

    return evaluation_report


# ------------------------------------------------------------------------------------ re-evaluation schedule


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


# -------------------------------------------------------------------------------------------- definitions


def build_reports_definitions(stage_specs: Sequence[dg.AssetSpec] | None = None) -> dg.Definitions:
    """Figure assets, the report asset and (when evaluation assets exist) the re-evaluation schedule."""
    specs = list(_stage_specs() if stage_specs is None else stage_specs)
    catalogue = figure_catalogue.load_figure_catalogue()
    figure_assets = [
        build_figure_asset(
            spec,
            [key for table in spec.tables for key in writers_of(table, specs, catalogue.secondary_tables)],
        )
        for spec in catalogue.figures.values()
    ]
    report_asset = build_report_asset(list(catalogue.figures))
    jobs: list[Any] = []
    schedules: list[dg.ScheduleDefinition] = []
    config = load_reevaluation_config()
    report_keys = [asset.key for asset in [*figure_assets, report_asset]]
    targets = discover_reevaluation_targets(
        specs, config, extra_downstream=report_keys if GROUP in config.downstream_groups else ()
    )
    if targets.per_format:
        job, schedule = build_reevaluation_schedule(
            targets, settings.current_profile().schedule.reevaluation_cron, config
        )
        jobs.append(job)
        schedules.append(schedule)
    return dg.Definitions(assets=[*figure_assets, report_asset], jobs=jobs, schedules=schedules)


defs = build_reports_definitions()
