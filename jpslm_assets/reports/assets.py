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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.artifacts import artifact_record, frame_version
from jpslm_assets.code_versions import versioned
from jpslm_assets.common import figures as figure_lib
from jpslm_assets.common.progress import StepTimings
from jpslm_assets.export import assets as export
from jpslm_assets.export import figures as figures_export
from jpslm_assets.io_manager import table_metadata, table_of
from jpslm_assets.judging import assets as judging
from jpslm_assets.kg import assets as kg
from jpslm_assets.marts import assets as marts
from jpslm_assets.qa import assets as qa
from jpslm_assets.reports import document as report_lib
from jpslm_assets.reports import figure_catalogue
from jpslm_assets.reports.assets_reevaluation import (
    build_reevaluation_schedule,
    discover_reevaluation_targets,
    load_reevaluation_config,
)
from jpslm_assets.store import DuckDBStore, read_tables
from jpslm_assets.training import assets as training

GROUP = "reports"
FIGURES_TABLE = "reports.figures"
REPORTS_TABLE = "reports.evaluation_reports"
REPORT_HISTORY_TABLE = "reports.report_history"


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
