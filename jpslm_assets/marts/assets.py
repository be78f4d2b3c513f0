"""Marts stage: the ``dbt_like_sql/`` models as Dagster assets and its SQL tests as asset checks.

One multi-asset (``dbt_like_sql_marts``) holds every model, like dagster-dbt's ``@dbt_assets``: each model
is an asset ``marts/<name>`` writing table ``marts.<name>`` through the IO manager (atomic, with lineage),
its code version is a hash of its file, and its upstream edges come from the tables its SQL reads (parsed
with sqlglot): ``marts.*`` tables are other models, anything else is mapped to the asset that writes that
table (by the ``table`` metadata every stage declares). Selecting a subset builds only those models; the
models they read must already be built.

SQL tests become asset checks on the model they are named after; ``-- severity: warn`` tests warn instead
of erroring. The same models run outside Dagster with ``jpslm-sql run --db FILE``.
"""

from collections.abc import Iterable, Iterator, Sequence

import dagster as dg

from jpslm_assets.artifacts import frame_version
from jpslm_assets.export import assets as export
from jpslm_assets.io_manager import table_metadata, table_of
from jpslm_assets.judging import assets as judging
from jpslm_assets.kg import assets as kg
from jpslm_assets.marts.sql_project import TARGET_SCHEMA, Project, load_project
from jpslm_assets.marts.sql_runs import build_model, run_test
from jpslm_assets.metadata import stored_table, table_value
from jpslm_assets.qa import assets as qa
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training import assets as training

GROUP = "marts"
UPSTREAM_STAGES = (kg.defs, qa.defs, training.defs, export.defs, judging.defs)


def model_key(name: str) -> dg.AssetKey:
    return dg.AssetKey([TARGET_SCHEMA, name])


def table_writers(definitions: Iterable[dg.Definitions]) -> dict[str, list[dg.AssetKey]]:
    """``schema.table`` -> keys of the assets whose ``table`` metadata names it."""
    writers: dict[str, list[dg.AssetKey]] = {}
    for defs in definitions:
        for item in defs.assets or []:
            specs = (
                item.specs
                if isinstance(item, dg.AssetsDefinition)
                else [item]
                if isinstance(item, dg.AssetSpec)
                else []
            )
            for spec in specs:
                table = table_of(spec.metadata)
                if table is not None:
                    writers.setdefault(table, []).append(spec.key)
    return {table: sorted(keys, key=lambda k: k.to_user_string()) for table, keys in writers.items()}


def model_specs(project: Project, writers: dict[str, list[dg.AssetKey]]) -> list[dg.AssetSpec]:
    specs = []
    for name in project.order:
        model = project.models[name]
        deps = [model_key(dep) for dep in sorted(model.depends_on)]
        for source in sorted(model.sources):
            deps.extend(writers.get(source, []))
        specs.append(
            dg.AssetSpec(
                key=model_key(name),
                deps=deps,
                description=f"{model.description}\n\nBuilt from `dbt_like_sql/{model.path.name}`.",
                group_name=GROUP,
                kinds={"duckdb", "sql" if model.kind == "sql" else "python"},
                code_version=model.code_version,
                metadata={
                    **table_metadata(model.table),
                    "model_file": model.path.name,
                    "reads": sorted(model.reads),
                },
                skippable=True,
            ).with_io_manager_key("io_manager")
        )
    return specs


def check_specs(project: Project) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            name=test.name,
            asset=model_key(project.test_target(test)),
            description=f"{test.description} (dbt_like_sql/tests/{test.path.name}; passes with zero rows)",
            additional_deps=[model_key(m) for m in sorted(test.models) if m != project.test_target(test)],
        )
        for test in sorted(project.tests.values(), key=lambda t: t.name)
    ]


def build_marts_assets(project: Project, writers: dict[str, list[dg.AssetKey]]) -> dg.AssetsDefinition:
    """The multi-asset that builds the selected models in dependency order, then runs their tests."""

    @dg.multi_asset(
        name="dbt_like_sql_marts",
        specs=model_specs(project, writers),
        check_specs=check_specs(project),
        can_subset=True,
    )
    def dbt_like_sql_marts(context: dg.AssetExecutionContext, store: DuckDBStore) -> Iterator[object]:
        """Builds the marts of dbt_like_sql/ and runs its SQL tests as asset checks."""
        selected = {key.path[-1] for key in context.selected_asset_keys}
        for name in project.order:
            if name not in selected:
                continue
            # A connection per model: the IO manager writes each output (in this process) between models.
            with store.connect(read_only=store.exists()) as conn:
                result = build_model(conn, project, name)
            if result.stubbed_sources:
                context.log.warning(
                    f"marts.{name}: {', '.join(result.stubbed_sources)} not materialized yet; read as empty"
                )
            frame = result.frame
            yield dg.Output(
                frame,
                output_name=model_key(name).to_python_identifier(),
                data_version=dg.DataVersion(frame_version(frame)),
                metadata={
                    **stored_table(f"marts.{name}", frame),
                    "empty_sources": ", ".join(result.stubbed_sources) or "none",
                    "preview": table_value(frame, limit=10),
                },
            )
        for check_key in context.selected_asset_check_keys:
            with store.connect(read_only=True) as conn:
                outcome = run_test(conn, project, check_key.name)
            yield dg.AssetCheckResult(
                check_name=check_key.name,
                asset_key=check_key.asset_key,
                passed=outcome.passed,
                severity=dg.AssetCheckSeverity.WARN
                if outcome.severity == "warn"
                else dg.AssetCheckSeverity.ERROR,
                metadata={
                    "failing_rows": outcome.failing_rows,
                    "sample": dg.MetadataValue.json(outcome.sample) if outcome.sample else "none",
                    "error": outcome.error or "none",
                },
            )

    return dbt_like_sql_marts


def build_defs(stages: Sequence[dg.Definitions] = UPSTREAM_STAGES) -> dg.Definitions:
    project = load_project()
    return dg.Definitions(assets=[build_marts_assets(project, table_writers(stages))])


defs = build_defs()
