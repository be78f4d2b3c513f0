"""The report assets materialized through Dagster on a temporary DuckDB file and DAGSTER_HOME."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.reports import assets as reports
from jpslm_assets.reports import figure_catalogue
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.report_samples import write_samples

FIGURE_KEYS = sorted(figure_catalogue.load_figure_catalogue().figures)


def _materialize(
    store: DuckDBStore, instance: dg.DagsterInstance, **kwargs: object
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        reports.defs.assets,  # type: ignore[arg-type]
        resources={"store": store, "io_manager": DuckDBTableIOManager(store=store)},
        instance=instance,
        **kwargs,  # type: ignore[arg-type]
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, object]:
    (event,) = result.asset_materializations_for_node(asset)
    return {key: getattr(value, "value", value) for key, value in event.metadata.items()}


def _data_uri_png(markdown: str) -> bytes:
    match = re.search(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:200]
    return base64.b64decode(match.group(1))


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as test_instance:
        yield test_instance


def test_reports_over_an_empty_store_show_placeholders_not_a_crash(
    store: DuckDBStore, instance: dg.DagsterInstance, data_dir: Path
) -> None:
    assert not store.file.exists()
    result = _materialize(store, instance)
    assert result.success
    rows = store.query("SELECT figure, status, placeholder_reason FROM reports.figures ORDER BY figure")
    assert rows["figure"].to_list() == FIGURE_KEYS
    assert set(rows["status"]) == {"placeholder"}
    assert all("Materialize" in reason for reason in rows["placeholder_reason"])
    for key in FIGURE_KEYS:
        metadata = _metadata(result, f"figure_{key}")
        assert metadata["status"] == "placeholder"
        assert str(metadata["figure"]).startswith("**No data yet.**")
        assert _data_uri_png(str(metadata["figure"])).startswith(b"\x89PNG")
    report = _metadata(result, "evaluation_report")
    assert report["placeholders"] == len(FIGURE_KEYS)
    html = Path(str(report["report_path"])).read_text("utf-8")
    assert html.count("データがまだありません") >= len(FIGURE_KEYS)
    assert "marts.score_summary is empty" in html


def test_every_figure_is_attached_as_an_image_and_embedded_in_the_report(
    store: DuckDBStore, instance: dg.DagsterInstance, data_dir: Path
) -> None:
    write_samples(store)
    result = _materialize(store, instance)
    assert result.success
    figure_rows = store.query("SELECT * FROM reports.figures ORDER BY figure")
    assert figure_rows["figure"].to_list() == FIGURE_KEYS
    assert set(figure_rows["status"]) == {"ok"}
    report = _metadata(result, "evaluation_report")
    html = Path(str(report["report_path"])).read_text("utf-8")
    for row in figure_rows.iter_rows(named=True):
        metadata = _metadata(result, f"figure_{row['figure']}")
        png = _data_uri_png(str(metadata["figure"]))
        # The image in the UI, the file on disk, the table row and the HTML report are the same bytes.
        assert hashlib.sha256(png).hexdigest() == row["artifact_sha256"]
        assert Path(row["artifact_path"]).read_bytes() == png
        assert Path(row["artifact_path"]).parent == data_dir.resolve() / "artifacts" / "figures"
        assert base64.b64encode(png).decode() in html
        assert metadata["seconds_total"] >= 0  # type: ignore[operator]
    assert report["placeholders"] == 0 and report["figures"] == len(FIGURE_KEYS)
    assert "| tiny-llama | 120 | q4_k_m | 12 |" in str(report["score_summary"])
    comparison = _metadata(result, "figure_model_comparison")
    assert comparison["stats"] == {"confidence_intervals": True, "series": 4}
    assert comparison["source_rows"] == {"marts.score_summary": 4}

    # A second run writes a second report; the history keeps both, the asset table the newest.
    second = _materialize(store, instance, selection=["evaluation_report"])
    assert second.success
    history = store.query("SELECT run_id, artifact_path FROM reports.report_history ORDER BY created_at")
    assert history["run_id"].to_list() == [result.run_id, second.run_id]
    assert all(Path(p).is_file() for p in history["artifact_path"])
    latest = store.query("SELECT run_id FROM reports.evaluation_reports")
    assert latest["run_id"].to_list() == [second.run_id]
    # Lineage: the report's inputs are the figure rows it embedded.
    inputs = store.query(
        "SELECT upstream_asset_key FROM lineage.inputs WHERE asset_key = 'evaluation_report' AND run_id = ?",
        [second.run_id],
    )
    assert sorted(inputs["upstream_asset_key"]) == [f"figure_{key}" for key in FIGURE_KEYS]


def test_bad_input_fails_the_figure_clearly_and_keeps_the_previous_rows(
    store: DuckDBStore, instance: dg.DagsterInstance, data_dir: Path
) -> None:
    write_samples(store)
    first = _materialize(store, instance, selection=["figure_model_comparison"])
    assert first.success
    before = store.query("SELECT * FROM reports.figures WHERE figure = 'model_comparison'")
    with store.connect() as conn:  # an older mart without the column the figure needs
        conn.execute("ALTER TABLE marts.score_summary DROP COLUMN avg_score")
    failed = _materialize(store, instance, selection=["figure_model_comparison"], raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failure.step_failure_data.error)
    assert "marts.score_summary lacks column(s) ['avg_score']" in message
    after = store.query("SELECT * FROM reports.figures WHERE figure = 'model_comparison'")
    assert after.equals(before)
    assert Path(after["artifact_path"][0]).is_file()


def test_report_refuses_a_figure_file_changed_since_it_was_recorded(
    store: DuckDBStore, instance: dg.DagsterInstance, data_dir: Path
) -> None:
    assert _materialize(store, instance).success
    row = store.query("SELECT artifact_path FROM reports.figures WHERE figure = 'radar'").row(0)
    Path(row[0]).write_bytes(b"tampered")
    failed = _materialize(store, instance, selection=["evaluation_report"], raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "re-materialize figure_radar" in str(failure.step_failure_data.error)


def test_figure_assets_depend_on_the_assets_that_write_their_tables(store: DuckDBStore) -> None:
    @dg.asset(metadata=table_metadata("marts.score_summary"))
    def summary_writer() -> None: ...

    @dg.asset
    def category_scores() -> None: ...  # no table metadata: matched by the table's name

    @dg.asset(metadata=table_metadata("qa.training_subset", partition_expr="n"))
    def training_subset() -> None: ...

    @dg.asset(metadata=table_metadata("train.stage1_runs"))
    def stage1_lora_adapter() -> None: ...  # also fills train.loss_curve, listed in reports.yaml

    @dg.asset(metadata=table_metadata("train.stage2_runs"))
    def stage2_lora_adapter() -> None: ...  # so does this one

    stage_assets = [summary_writer, category_scores, training_subset, stage1_lora_adapter, stage2_lora_adapter]
    specs = reports.asset_specs([dg.Definitions(assets=stage_assets)])
    defs = reports.build_reports_definitions(specs)
    graph = dg.Definitions.merge(
        defs,
        dg.Definitions(
            assets=stage_assets, resources={"store": store, "io_manager": DuckDBTableIOManager(store=store)}
        ),
    )
    asset_graph = graph.resolve_asset_graph()

    def parents(key: str) -> set[str]:
        return {k.to_user_string() for k in asset_graph.get(dg.AssetKey(key)).parent_keys}

    assert parents("figure_model_comparison") == {"summary_writer"}
    assert parents("figure_radar") == {"summary_writer"}  # score_distribution has no writer here
    assert parents("figure_category_heatmap") == {"category_scores"}
    assert parents("figure_subset_quality") == {"training_subset"}
    assert parents("figure_loss_curves") == {"stage1_lora_adapter", "stage2_lora_adapter"}
    assert parents("evaluation_report") == {f"figure_{key}" for key in FIGURE_KEYS}
    for key in FIGURE_KEYS:
        node = asset_graph.get(dg.AssetKey(f"figure_{key}"))
        assert node.group_name == "reports" and node.code_version and node.description
        assert node.kinds == {"matplotlib", "duckdb"}
    # No reevaluation schedule without per-format evaluation assets to run.
    assert not list(defs.schedules or [])


def test_code_version_changes_when_the_figure_configuration_changes() -> None:
    spec = figure_catalogue.load_figure_catalogue().figures["radar"]
    one = reports.build_figure_asset(spec, [])
    other = reports.build_figure_asset(spec.model_copy(update={"caption": "changed"}), [])
    assert one.code_versions_by_key[one.key] != other.code_versions_by_key[other.key]


def test_read_tables_returns_none_for_missing_tables(store: DuckDBStore) -> None:
    assert reports.read_tables(store, ["marts.score_summary"]) == {"marts.score_summary": None}
    store.write_slice("marts.score_summary", pl.DataFrame({"model": ["a"]}), {})
    frames = reports.read_tables(store, ["marts.score_summary", "eval.judge_scores"])
    assert frames["marts.score_summary"] is not None and frames["marts.score_summary"].height == 1
    assert frames["eval.judge_scores"] is None
