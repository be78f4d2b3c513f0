"""The shipped seed graph and the validation that guards every graph (pure functions, no Dagster)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from importlib import resources
from pathlib import Path

import polars as pl
import pytest

from jpslm_assets.kg import graph as kg
from jpslm_assets.kg import tables as graph_tables

SEED = Path(str(resources.files("jpslm_assets") / "data" / "kg"))
EXPECTED_TYPES = {
    "HAS_CHAPTER": 40,
    "HAS_SECTION": 40,
    "HAS_ITEM": 30,
    "DESCRIBED_IN": 30,
    "DEFINED_IN": 22,
    "SUBJECT_TO": 22,
    "USED_IN": 20,
    "REQUIRES": 20,
    "AFFECTS": 18,
    "MITIGATES": 16,
    "PRECEDES": 10,
}
VOLUMES = [
    "調査編",
    "計画編",
    "設計編",
    "維持管理編（河川編）",
    "維持管理編（ダム編）",
    "維持管理編（砂防編）",
]


@pytest.fixture(scope="module")
def graph() -> kg.KnowledgeGraph:
    return kg.load_seed()


@pytest.fixture(scope="module")
def vocabulary() -> kg.Vocabulary:
    return kg.load_vocabulary()


# ------------------------------------------------------------------------------------------- the seed


def test_seed_has_the_papers_shape(graph: kg.KnowledgeGraph, vocabulary: kg.Vocabulary) -> None:
    assert len(graph.nodes) == 200
    assert len(graph.relations) == 268
    assert graph_tables.relation_type_counts(graph, vocabulary) == EXPECTED_TYPES
    assert graph_tables.node_label_counts(graph, vocabulary) == {
        "Volume": 6,
        "Chapter": 40,
        "Section": 40,
        "Item": 30,
        "Concept": 84,
    }
    assert sorted(node.name for node in graph.nodes if node.label == "Volume") == sorted(VOLUMES)
    # All eight test-set categories occur.
    assert set(Counter(node.category for node in graph.nodes)) == set(vocabulary.categories)


def test_seed_records_follow_the_authoring_rules(graph: kg.KnowledgeGraph) -> None:
    for node in graph.nodes:
        assert 80 <= len(node.description) <= 200, (node.node_id, len(node.description))
        assert node.name_en, node.node_id
        assert any("\u3040" <= char <= "\u9fff" for char in node.name), f"{node.node_id} name is not Japanese"
    names = Counter(node.name for node in graph.nodes)
    assert max(names.values()) == 1, [name for name, count in names.items() if count > 1]
    for relation in graph.relations:
        assert relation.description.endswith("。"), relation.relation_id
    # Every node takes part in at least one relation.
    touched = {r.source_id for r in graph.relations} | {r.target_id for r in graph.relations}
    assert touched == {node.node_id for node in graph.nodes}


def test_every_concept_cites_where_it_is_treated(graph: kg.KnowledgeGraph) -> None:
    nodes = graph.node_by_id()
    for relation in graph.relations:
        if relation.relation_type in ("DESCRIBED_IN", "DEFINED_IN"):
            concept, place = nodes[relation.source_id], nodes[relation.target_id]
            assert (concept.volume, concept.chapter, concept.section) == (
                place.volume,
                place.chapter,
                place.section,
            )
    frame = graph_tables.nodes_frame(graph)
    levee = frame.filter(pl.col("name") == "堤防").row(0, named=True)
    assert levee["location"] == "設計編 第3章 第2節"
    assert (levee["chapter"], levee["section"]) == ("第3章 河川構造物の設計", "第2節 堤防")


def test_frames_have_the_contract_columns(graph: kg.KnowledgeGraph) -> None:
    nodes, relations = graph_tables.nodes_frame(graph), graph_tables.relations_frame(graph)
    assert nodes.columns == list(graph_tables.NODE_SCHEMA)
    assert relations.columns == list(graph_tables.RELATION_SCHEMA)
    assert nodes["node_id"].is_sorted() and relations["relation_id"].is_sorted()
    assert nodes.filter(pl.col("label") == "Volume")["chapter"].null_count() == 6
    row = relations.filter(pl.col("relation_type") == "HAS_CHAPTER").row(0, named=True)
    assert (row["source_label"], row["target_label"]) == ("Volume", "Chapter")


def test_graph_version_is_a_content_hash(graph: kg.KnowledgeGraph) -> None:
    again = kg.load_seed()
    assert kg.graph_version(again) == kg.graph_version(graph)
    changed = kg.KnowledgeGraph(graph.nodes, graph.relations[1:], graph.origin)
    assert kg.graph_version(changed) != kg.graph_version(graph)


def test_chart_is_a_png(graph: kg.KnowledgeGraph, vocabulary: kg.Vocabulary) -> None:
    png = graph_tables.relation_type_chart(graph_tables.relation_type_counts(graph, vocabulary), "関係タイプ")
    assert png.startswith(b"\x89PNG") and len(png) > 5000


# ----------------------------------------------------------------------------------------- bad input


def _copy_seed(tmp_path: Path) -> Path:
    folder = tmp_path / "seed"
    folder.mkdir()
    for name in (kg.NODES_FILE, kg.RELATIONS_FILE):
        shutil.copy(SEED / name, folder / name)
    return folder


def _edit_line(path: Path, number: int, edit) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = edit(lines[number - 1])
    path.write_bytes(b"\n".join(lines))


def _edit_record(path: Path, number: int, **changes) -> None:
    def edit(raw: bytes) -> bytes:
        record = json.loads(raw)
        record.update(changes)
        return json.dumps(record, ensure_ascii=False).encode("utf-8")

    _edit_line(path, number, edit)


def _problems(folder: Path) -> list[str]:
    with pytest.raises(kg.KnowledgeGraphError) as caught:
        kg.load_seed(folder)
    assert str(folder) in str(caught.value)
    return caught.value.problems


def test_dangling_edge_names_relation_and_node(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_record(folder / kg.RELATIONS_FILE, 117, target_id="N-204")
    problems = _problems(folder)
    assert any(
        "relations.jsonl line 117: relation R-117 (DESCRIBED_IN) points to missing target node N-204" in p
        for p in problems
    ), problems


def test_unknown_relation_type_is_named(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_record(folder / kg.RELATIONS_FILE, 200, relation_type="CAUSES")
    (problem,) = _problems(folder)
    assert "relations.jsonl line 200: relation R-200 (CAUSES): unknown relation type 'CAUSES'" in problem
    assert "add it to vocabulary.yaml" in problem


def test_duplicate_node_id_names_both_lines(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_record(folder / kg.NODES_FILE, 150, node_id="N-149")
    problems = _problems(folder)
    assert any(
        "nodes.jsonl line 150: duplicate node id N-149 (first at nodes.jsonl line 149)" in p for p in problems
    ), problems


def test_broken_json_line_is_named(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_line(folder / kg.NODES_FILE, 12, lambda raw: raw[:-1])  # drop the closing brace
    problems = _problems(folder)
    assert problems[0].startswith("nodes.jsonl line 12: not valid JSON ("), problems


def test_empty_name_is_named(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_record(folder / kg.NODES_FILE, 143, name="  ")
    problems = _problems(folder)
    assert "nodes.jsonl line 143: node N-143 name is empty" in problems


def test_invalid_utf8_is_named(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_line(folder / kg.RELATIONS_FILE, 9, lambda raw: raw[:40] + b"\xff\xfe" + raw[40:])
    problems = _problems(folder)
    assert problems[0].startswith("relations.jsonl line 9: not valid UTF-8 (byte 0xff at byte 41"), problems


def test_missing_field_and_unknown_field(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_line(
        folder / kg.NODES_FILE,
        20,
        lambda raw: json.dumps(
            {k: v for k, v in json.loads(raw).items() if k != "category"} | {"nmae": "x"}, ensure_ascii=False
        ).encode(),
    )
    problems = _problems(folder)
    assert any("nodes.jsonl line 20: node N-020 category is missing" in p for p in problems), problems
    assert any("nmae is not a known field" in p for p in problems), problems


def test_relation_endpoint_of_the_wrong_label(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_record(folder / kg.RELATIONS_FILE, 1, target_id="N-143")  # HAS_CHAPTER to a concept
    problems = _problems(folder)
    assert any("target N-143 is a Concept, but HAS_CHAPTER targets must be Chapter" in p for p in problems)


def test_place_must_name_existing_structure(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_record(folder / kg.NODES_FILE, 143, section="第9節 存在しない節")
    problems = _problems(folder)
    assert any("section '第9節 存在しない節' is not a Section node of 設計編" in p for p in problems), (
        problems
    )


def test_structural_relation_must_agree_with_places(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    # R-001 is 調査編 HAS_CHAPTER 第1章 総説; point it at a chapter of 計画編 instead.
    _edit_record(folder / kg.RELATIONS_FILE, 1, target_id="N-015")
    problems = _problems(folder)
    assert any("has volume '計画編', but the relation places it under '調査編'" in p for p in problems), (
        problems
    )


def test_unreadable_records_are_reported_before_graph_checks(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    _edit_record(folder / kg.NODES_FILE, 143, name="")
    _edit_record(folder / kg.RELATIONS_FILE, 200, relation_type="CAUSES")
    _edit_line(folder / kg.RELATIONS_FILE, 201, lambda raw: b"{oops")
    # A record that cannot be read would otherwise reappear as "missing node" in every relation using it.
    assert {p.split(":")[0] for p in _problems(folder)} == {
        "nodes.jsonl line 143",
        "relations.jsonl line 201",
    }
    _edit_record(folder / kg.NODES_FILE, 143, name="堤防")
    shutil.copy(SEED / kg.RELATIONS_FILE, folder / kg.RELATIONS_FILE)
    _edit_record(folder / kg.RELATIONS_FILE, 200, relation_type="CAUSES")
    _edit_record(folder / kg.RELATIONS_FILE, 117, target_id="N-204")
    assert len(_problems(folder)) == 2


def test_missing_seed_file(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    (folder / kg.RELATIONS_FILE).unlink()
    (problem,) = _problems(folder)
    assert "relations.jsonl not found" in problem


def test_bom_and_blank_lines_are_tolerated(tmp_path: Path) -> None:
    folder = _copy_seed(tmp_path)
    path = folder / kg.NODES_FILE
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n\n", 3))
    assert len(kg.load_seed(folder).nodes) == 200


def test_vocabulary_rejects_identifiers_unsafe_for_cypher(tmp_path: Path) -> None:
    text = (
        (SEED / kg.VOCABULARY_FILE)
        .read_text("utf-8")
        .replace("  PRECEDES:", "  PRECEDES`) DETACH DELETE n//:")
    )
    path = tmp_path / "vocabulary.yaml"
    path.write_text(text, "utf-8")
    with pytest.raises(kg.KnowledgeGraphError, match="must be plain words"):
        kg.load_vocabulary(path)


# ------------------------------------------------------------------------------------ table checks


def test_table_checks_find_problems(graph: kg.KnowledgeGraph, vocabulary: kg.Vocabulary) -> None:
    nodes, relations = graph_tables.nodes_frame(graph), graph_tables.relations_frame(graph)
    assert graph_tables.duplicate_ids(nodes, "node_id") == []
    assert graph_tables.dangling_endpoints(relations, nodes) == []
    doubled = pl.concat([nodes, nodes.head(1)])
    assert graph_tables.duplicate_ids(doubled, "node_id") == ["node_id N-001 appears 2 times"]
    without = nodes.filter(pl.col("node_id") != "N-007")
    assert graph_tables.dangling_endpoints(relations, without) == [
        "relation R-001 (HAS_CHAPTER) points to missing node N-007"
    ]
    odd = relations.with_columns(pl.lit("CAUSES").alias("relation_type")).head(1)
    (problem,) = graph_tables.values_outside(odd, "relation_id", "relation_type", vocabulary.relation_types)
    assert problem.startswith("R-001: relation_type 'CAUSES' is not in the vocabulary")
    assert graph_tables.stored_nodes_differ(nodes, graph) == ""
    assert "only in kg.nodes: none" in graph_tables.stored_nodes_differ(without, graph)
    renamed = nodes.with_columns(
        pl.when(pl.col("node_id") == "N-010").then(pl.lit("別名")).otherwise(pl.col("name")).alias("name")
    )
    assert graph_tables.stored_nodes_differ(renamed, graph) == "1 node(s) changed, e.g. N-010"
