"""The kg assets and checks in Dagster, reading the seed store into a test DuckDB file."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from jpslm_assets.io_manager import DuckDBTableIOManager
from jpslm_assets.kg import assets as kg
from jpslm_assets.kg import graph as graph_lib
from jpslm_assets.metadata import table_rows
from jpslm_assets.resources.graph_store import (
    GraphStore,
    GraphStoreError,
    GraphStoreTimeout,
    SeedGraphStore,
    run_with_deadline,
)
from jpslm_assets.resources.graph_store_neo4j import Neo4jGraphStore
from jpslm_assets.store import DuckDBStore

SEED = Path(str(resources.files("jpslm_assets") / "data" / "kg"))
CHECKS = [
    kg.kg_node_ids_unique,
    kg.kg_node_labels_in_vocabulary,
    kg.kg_relation_ids_unique,
    kg.kg_relation_types_in_vocabulary,
    kg.kg_relation_endpoints_exist,
]


def materialize_kg(
    store: DuckDBStore,
    graph_store: GraphStore,
    selection: Sequence[str] | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [kg.kg_nodes, kg.kg_relations, *CHECKS],
        resources={
            "store": store,
            "io_manager": DuckDBTableIOManager(store=store),
            "graph_store": graph_store,
        },
        selection=list(selection) if selection else None,
        raise_on_error=raise_on_error,
    )


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Every message in the failed steps' error chains."""
    texts: list[str] = []
    for event in result.get_step_failure_events():
        error: Any = event.step_failure_data.error
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts)


def kg_tables(store: DuckDBStore) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (
        store.query("SELECT * FROM kg.nodes ORDER BY node_id"),
        store.query("SELECT * FROM kg.relations ORDER BY relation_id"),
    )


def bad_seed(tmp_path: Path, line: int, old: str, new: str, file: str = graph_lib.RELATIONS_FILE) -> Path:
    folder = tmp_path / "bad_seed"
    shutil.copytree(SEED, folder)
    path = folder / file
    lines = path.read_text("utf-8").split("\n")
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new)
    path.write_text("\n".join(lines), "utf-8")
    return folder


def test_kg_assets_from_the_seed(store: DuckDBStore) -> None:
    result = materialize_kg(store, SeedGraphStore())
    assert result.success
    nodes, relations = kg_tables(store)
    assert nodes.height == 200 and relations.height == 268
    assert relations["relation_type"].n_unique() == 11
    for column in (
        "node_id",
        "label",
        "name",
        "name_en",
        "description",
        "volume",
        "chapter",
        "section",
        "location",
    ):
        assert column in nodes.columns
    for column in ("relation_id", "source_id", "relation_type", "target_id", "description"):
        assert column in relations.columns
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == len(CHECKS) and all(e.passed for e in evaluations)

    metadata = result.asset_materializations_for_node("kg_relations")[0].metadata
    assert metadata["dagster/row_count"].value == 268
    # Recorded by the IO manager for the rows it stored, not by the asset.
    assert [column.name for column in metadata["dagster/column_schema"].schema.columns] == relations.columns
    assert metadata["relation_type_chart"].value.startswith("![relation types](data:image/png;base64,iVBOR")
    assert {"relation type": "HAS_CHAPTER", "count": 40, "share": "14.9%"} in table_rows(
        metadata["relations_by_type"]
    )
    node_metadata = result.asset_materializations_for_node("kg_nodes")[0].metadata
    by_label = {row["label"]: row["count"] for row in table_rows(node_metadata["nodes_by_label"])}
    assert by_label["Concept"] == 84 and sum(by_label.values()) == node_metadata["dagster/row_count"].value
    assert node_metadata["graph_source"].value == "the shipped seed (jpslm_assets/data/kg)"

    lineage = store.query(
        "SELECT asset_key, upstream_asset_key FROM lineage.inputs WHERE asset_key = 'kg_relations'"
    )
    assert lineage["upstream_asset_key"].to_list() == ["kg_nodes"]


def test_data_version_changes_only_with_the_graph(store: DuckDBStore, tmp_path: Path) -> None:
    def versions(result: dg.ExecuteInProcessResult) -> dict[str, str]:
        return {
            key: result.asset_materializations_for_node(key)[0].tags["dagster/data_version"]
            for key in ("kg_nodes", "kg_relations")
        }

    first = versions(materialize_kg(store, SeedGraphStore()))
    again = versions(materialize_kg(store, SeedGraphStore()))
    assert first == again
    changed_folder = bad_seed(tmp_path, 163, "計画高水位を基準として", "計画高水位を基準に")
    changed = versions(materialize_kg(store, SeedGraphStore(folder=str(changed_folder))))
    assert changed["kg_nodes"] == first["kg_nodes"]
    assert changed["kg_relations"] != first["kg_relations"]


@pytest.mark.parametrize(
    ("file", "line", "old", "new", "expected"),
    [
        pytest.param(
            graph_lib.RELATIONS_FILE, 117, '"target_id": "N-073"', '"target_id": "N-204"',
            "relations.jsonl line 117: relation R-117 (DESCRIBED_IN) points to missing target node N-204",
            id="dangling-edge",
        ),
        pytest.param(
            graph_lib.RELATIONS_FILE, 200, '"USED_IN"', '"CAUSES"',
            "relations.jsonl line 200: relation R-200 (CAUSES): unknown relation type 'CAUSES'",
            id="unknown-type",
        ),
        pytest.param(
            graph_lib.NODES_FILE, 150, '"N-150"', '"N-149"',
            "nodes.jsonl line 150: duplicate node id N-149 (first at nodes.jsonl line 149)",
            id="duplicate-id",
        ),
        pytest.param(
            graph_lib.NODES_FILE, 12, '"category"', '"category',
            "nodes.jsonl line 12: not valid JSON",
            id="broken-json",
        ),
        pytest.param(
            graph_lib.NODES_FILE, 143, '"name": "堤防"', '"name": ""',
            "nodes.jsonl line 143: node N-143 name is empty",
            id="empty-name",
        ),
    ],
)  # fmt: skip
def test_bad_input_fails_and_keeps_the_tables(
    store: DuckDBStore, tmp_path: Path, file: str, line: int, old: str, new: str, expected: str
) -> None:
    assert materialize_kg(store, SeedGraphStore()).success
    before = kg_tables(store)
    folder = bad_seed(tmp_path, line, old, new, file)
    result = materialize_kg(store, SeedGraphStore(folder=str(folder)), raise_on_error=False)
    assert not result.success
    assert expected in failure_text(result)
    after = kg_tables(store)
    assert after[0].equals(before[0]) and after[1].equals(before[1])


def test_invalid_utf8_fails_and_keeps_the_tables(store: DuckDBStore, tmp_path: Path) -> None:
    assert materialize_kg(store, SeedGraphStore()).success
    before = kg_tables(store)
    folder = tmp_path / "bad_seed"
    shutil.copytree(SEED, folder)
    path = folder / graph_lib.NODES_FILE
    data = path.read_bytes().split(b"\n")
    assert "編".encode() in data[20]
    data[20] = data[20].replace("編".encode(), b"\x95\xd2", 1)  # the Shift_JIS bytes of 編, not UTF-8
    path.write_bytes(b"\n".join(data))
    result = materialize_kg(store, SeedGraphStore(folder=str(folder)), raise_on_error=False)
    assert not result.success
    assert "nodes.jsonl line 21: not valid UTF-8" in failure_text(result)
    after = kg_tables(store)
    assert after[0].equals(before[0]) and after[1].equals(before[1])


def test_relations_refuse_a_stale_node_table(store: DuckDBStore, tmp_path: Path) -> None:
    assert materialize_kg(store, SeedGraphStore()).success
    before = kg_tables(store)
    renamed = bad_seed(tmp_path, 143, '"name": "堤防"', '"name": "堤防（河川）"', graph_lib.NODES_FILE)
    # Only kg_relations re-read from a graph whose nodes changed: kg.nodes is now stale.
    result = materialize_kg(
        store, SeedGraphStore(folder=str(renamed)), ["kg_relations"], raise_on_error=False
    )
    assert not result.success
    assert "kg.nodes holds a different graph" in failure_text(result)
    assert "1 node(s) changed, e.g. N-143" in failure_text(result)
    assert kg_tables(store)[1].equals(before[1])


def _run_checks(store: DuckDBStore) -> dict[str, bool]:
    result = dg.materialize(
        [kg.kg_nodes, kg.kg_relations, *CHECKS],
        resources={
            "store": store,
            "io_manager": DuckDBTableIOManager(store=store),
            "graph_store": SeedGraphStore(),
        },
        selection=dg.AssetSelection.checks(*CHECKS),
        raise_on_error=False,
    )
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_checks_fail_on_corrupted_tables(store: DuckDBStore) -> None:
    assert materialize_kg(store, SeedGraphStore()).success
    assert all(_run_checks(store).values())
    # Edits outside the pipeline (a notebook, a hand-written SQL fix) are what the checks guard against.
    with store.connect() as conn:
        conn.execute("INSERT INTO kg.nodes SELECT * FROM kg.nodes WHERE node_id = 'N-001'")
        conn.execute("UPDATE kg.nodes SET label = 'Chapterr' WHERE node_id = 'N-007'")
    evaluations = _run_checks(store)
    assert evaluations["kg_node_ids_unique"] is False
    assert evaluations["kg_node_labels_in_vocabulary"] is False
    # The endpoint check reads kg.nodes, so Dagster does not run it after kg.nodes' blocking checks fail.
    assert "kg_relation_endpoints_exist" not in evaluations

    assert materialize_kg(store, SeedGraphStore()).success
    with store.connect() as conn:
        conn.execute("UPDATE kg.relations SET relation_type = 'CAUSES' WHERE relation_id = 'R-200'")
        conn.execute("DELETE FROM kg.nodes WHERE node_id = 'N-200'")
        conn.execute("INSERT INTO kg.relations SELECT * FROM kg.relations WHERE relation_id = 'R-001'")
    assert _run_checks(store) == {
        "kg_node_ids_unique": True,
        "kg_node_labels_in_vocabulary": True,
        "kg_relation_ids_unique": False,
        "kg_relation_types_in_vocabulary": False,
        "kg_relation_endpoints_exist": False,
    }


def test_blocking_check_stops_downstream(store: DuckDBStore) -> None:
    @dg.asset(deps=[kg.kg_relations])
    def downstream() -> None:
        raise AssertionError("must not run after a failed blocking check")

    assert materialize_kg(store, SeedGraphStore()).success
    with store.connect() as conn:
        conn.execute("DELETE FROM kg.nodes WHERE node_id = 'N-200'")
    result = dg.materialize(
        [kg.kg_nodes, kg.kg_relations, *CHECKS, downstream],
        resources={
            "store": store,
            "io_manager": DuckDBTableIOManager(store=store),
            "graph_store": SeedGraphStore(),
        },
        selection=dg.AssetSelection.assets("downstream")
        | dg.AssetSelection.checks(kg.kg_relation_endpoints_exist),
        raise_on_error=False,
    )
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {"kg_relation_endpoints_exist": False}
    assert not result.success
    assert not result.asset_materializations_for_node("downstream")


def test_profile_chooses_the_graph_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from jpslm_assets import settings

    assert isinstance(kg.graph_store_for(settings.load_profile("demo")), SeedGraphStore)
    monkeypatch.setenv("JPSLM_GRAPH_STORE", "neo4j")
    store = kg.graph_store_for(settings.load_profile("demo"))
    assert isinstance(store, Neo4jGraphStore)


def test_definitions_expose_the_kg_stage() -> None:
    defs = kg.defs
    assert {key.to_user_string() for key in defs.resolve_all_asset_keys()} == {"kg_nodes", "kg_relations"}
    assert defs.resolve_job_def("kg_publish").name == "kg_publish"
    specs = {spec.name: spec.blocking for check in defs.asset_checks or [] for spec in check.check_specs}
    assert specs == {check.check_key.name: True for check in CHECKS}


def test_deadline_bounds_a_call_that_blocks() -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(GraphStoreTimeout, match="waiting did not finish within 0.3 s"):
        run_with_deadline(release.wait, 0.3, "waiting")
    assert time.monotonic() - started < 1.0
    release.set()
    assert run_with_deadline(lambda: 7, 1.0, "adding") == 7

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_with_deadline(fail, 1.0, "raising")


def test_publish_batches_stay_small() -> None:
    graph_store = Neo4jGraphStore(uri="bolt://127.0.0.1:1", user="u", password="p", database="d")
    rows = [{"node_id": f"N-{i:03d}", "props": {"description": "あ" * 150}} for i in range(40)]
    batches = list(graph_store._batches(rows))
    assert [row for batch in batches for row in batch] == rows
    assert len(batches) > 1
    for batch in batches:
        assert len(json.dumps(batch, ensure_ascii=False).encode()) <= graph_store.max_batch_bytes + 2 * len(
            batch
        )
    assert len(list(graph_store.model_copy(update={"batch_size": 3})._batches(rows[:7]))) >= 3


def test_publish_job_names_missing_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEO4J_URI", raising=False)
    with pytest.raises(dg.DagsterInvalidConfigError, match="NEO4J_URI"):
        kg.defs.resolve_job_def("kg_publish").execute_in_process()


def test_bad_uri_is_named() -> None:
    graph_store = Neo4jGraphStore(uri="http://127.0.0.1:7474", user="u", password="p", database="d")
    with pytest.raises(GraphStoreError, match="NEO4J_URI 'http://127.0.0.1:7474' is not a usable Bolt URI"):
        graph_store.read_graph()


def test_the_profile_names_a_seed_folder_of_ones_own(
    store: DuckDBStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kg_seed_folder` (env JPSLM_KG_SEED_FOLDER) points the seed graph store at a user's own files."""
    from jpslm_assets import settings

    folder = bad_seed(tmp_path, 163, "計画高水位を基準として", "計画高水位を基準に")
    monkeypatch.setenv("JPSLM_KG_SEED_FOLDER", str(folder))
    profile = settings.load_profile()
    assert profile.kg_seed_folder == str(folder)
    chosen = kg.graph_store_for(profile)
    assert isinstance(chosen, SeedGraphStore) and chosen.folder == str(folder.resolve())
    relations = materialize_kg(store, chosen).asset_value("kg_relations")
    assert relations.filter(pl.col("description").str.contains("計画高水位を基準に")).height > 0
    monkeypatch.delenv("JPSLM_KG_SEED_FOLDER")
    assert kg.graph_store_for(settings.load_profile()).folder is None
