"""Template catalogue validation, expansion over the graph, and duplicate removal (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from jpslm_assets.artifacts import frame_version
from jpslm_assets.qa import generation as qa_generation
from jpslm_assets.qa.generation import GraphInputError, citation_of, deduplicate, expand_templates
from jpslm_assets.qa.templates import TemplateCatalogue, TemplateError, load_catalogue, parse_catalogue

DATA = Path(__file__).resolve().parents[1] / "jpslm_assets" / "data"
TEMPLATES = DATA / "qa_templates.yaml"
KG = DATA / "kg"


def shipped_catalogue() -> TemplateCatalogue:
    return load_catalogue(TEMPLATES)


def raw_catalogue() -> dict:
    return yaml.safe_load(TEMPLATES.read_text(encoding="utf-8"))


def seed_graph() -> tuple[pl.DataFrame, pl.DataFrame]:
    """The shipped seed knowledge graph, read with plain json (independent of the kg stage's loader)."""
    nodes = [
        json.loads(line) for line in (KG / "nodes.jsonl").read_text(encoding="utf-8").splitlines() if line
    ]
    relations = [
        json.loads(line) for line in (KG / "relations.jsonl").read_text(encoding="utf-8").splitlines() if line
    ]
    return pl.DataFrame(nodes), pl.DataFrame(relations)


def fixture_graph() -> tuple[pl.DataFrame, pl.DataFrame]:
    """A small graph with every relation type and every category, written for these tests."""

    def node(node_id, label, name, category, volume, chapter=None, section=None, description=None):
        return {
            "node_id": node_id,
            "label": label,
            "name": name,
            "name_en": f"{name} (en)",
            "description": description or f"{name}について定めた事項であり、試験用に用意した説明文である",
            "volume": volume,
            "chapter": chapter,
            "section": section,
            "category": category,
        }

    nodes = [
        node("V1", "Volume", "調査編", "Survey", "調査編"),
        node("V2", "Volume", "設計編", "Design", "設計編"),
        node("C1", "Chapter", "第1章 観測", "Survey", "調査編", "第1章 観測"),
        node("C2", "Chapter", "第3章 河川構造物", "Design", "設計編", "第3章 河川構造物"),
        node("S1", "Section", "第1節 雨量観測", "Survey", "調査編", "第1章 観測", "第1節 雨量観測"),
        node("S2", "Section", "第2節 堤防", "Design", "設計編", "第3章 河川構造物", "第2節 堤防"),
        node("I1", "Item", "堤防の天端幅", "Design", "設計編", "第3章 河川構造物", "第2節 堤防"),
        node("K1", "Concept", "堤防", "Design", "設計編", "第3章 河川構造物", "第2節 堤防"),
        node("K2", "Concept", "計画高水位", "Planning", "計画編", "第2章 洪水防御計画"),
        node("K3", "Concept", "洪水", "Hazard", "計画編"),
        node("K4", "Concept", "ボーリング調査", "Survey", "調査編", "第1章 観測"),
        node("K5", "Concept", "点検", "Maintenance-River", "維持管理編（河川編）"),
        node("K6", "Concept", "健全度評価", "Maintenance-Dam", "維持管理編（ダム編）"),
        node("K7", "Concept", "除石", "Maintenance-Sabo", "維持管理編（砂防編）"),
        node("K8", "Concept", "流域治水", "Comparative/Cross-Cutting", "計画編"),
    ]
    relations = [
        ("R01", "V1", "HAS_CHAPTER", "C1"),
        ("R02", "V2", "HAS_CHAPTER", "C2"),
        ("R03", "C1", "HAS_SECTION", "S1"),
        ("R04", "C2", "HAS_SECTION", "S2"),
        ("R05", "S2", "HAS_ITEM", "I1"),
        ("R06", "K1", "DESCRIBED_IN", "S2"),
        ("R07", "K2", "DEFINED_IN", "S2"),
        ("R08", "K1", "SUBJECT_TO", "K2"),
        ("R09", "K4", "USED_IN", "K1"),
        ("R10", "K6", "REQUIRES", "K5"),
        ("R11", "K3", "AFFECTS", "K1"),
        ("R12", "K8", "MITIGATES", "K3"),
        ("R13", "K5", "PRECEDES", "K6"),
        ("R14", "K7", "MITIGATES", "K3"),
    ]
    relation_rows = [
        {
            "relation_id": r,
            "source_id": s,
            "relation_type": t,
            "target_id": o,
            "description": f"{s}と{o}の関係。",
        }
        for r, s, t, o in relations
    ]
    return pl.DataFrame(nodes), pl.DataFrame(relation_rows)


# ----------------------------------------------------------------------------------------- catalogue


def test_shipped_catalogue_is_valid_and_covers_every_seed_relation_type() -> None:
    catalogue = shipped_catalogue()
    _, relations = seed_graph()
    assert set(relations["relation_type"].unique()) <= set(catalogue.relation_types)
    for relation_type, block in catalogue.relation_types.items():
        versions = {template.version for template in block.templates}
        directions = {template.direction for template in block.templates}
        assert versions == {"v1", "v2", "v3", "v4"}, relation_type
        assert directions == {"forward", "reverse"}, relation_type
        assert len(block.templates) >= 10, relation_type


def test_unknown_placeholder_names_the_template() -> None:
    raw = raw_catalogue()
    raw["relation_types"]["AFFECTS"]["templates"][2]["question"] = "「{source_nmae}」は何ですか。"
    with pytest.raises(TemplateError, match=r"AFFECTS\.q03.*unknown placeholder \{source_nmae\}"):
        parse_catalogue(raw)


def test_unknown_placeholder_in_an_answer_frame_names_the_frame() -> None:
    raw = raw_catalogue()
    raw["relation_types"]["PRECEDES"]["answers"]["v2"] += "{target_volumes}"
    with pytest.raises(TemplateError, match=r"answer frame PRECEDES\.v2.*\{target_volumes\}"):
        parse_catalogue(raw)


def test_answer_frame_without_a_citation_is_reported() -> None:
    raw = raw_catalogue()
    raw["relation_types"]["AFFECTS"]["answers"]["v4"] = "「{source_name}」は「{target_name}」に影響します。"
    with pytest.raises(TemplateError, match=r"answer frame AFFECTS\.v4 cites no standards location"):
        parse_catalogue(raw)


def test_template_pointing_to_a_missing_answer_frame_is_reported() -> None:
    raw = raw_catalogue()
    raw["relation_types"]["USED_IN"]["templates"][0]["answer"] = "v9"
    with pytest.raises(TemplateError, match=r"USED_IN\.q01.*answer frame 'v9' is not defined"):
        parse_catalogue(raw)


def test_malformed_braces_are_reported_with_the_template() -> None:
    raw = raw_catalogue()
    raw["relation_types"]["REQUIRES"]["templates"][1]["question"] = "「{source_name」は必要ですか。"
    with pytest.raises(TemplateError, match=r"REQUIRES\.q02.*malformed braces"):
        parse_catalogue(raw)


def test_relation_type_without_templates_names_type_and_relations() -> None:
    nodes, relations = fixture_graph()
    raw = raw_catalogue()
    del raw["relation_types"]["PRECEDES"]
    catalogue = parse_catalogue(raw)
    with pytest.raises(TemplateError, match=r"PRECEDES \(e\.g\. relations R13\).*relation_types"):
        expand_templates(nodes, relations, catalogue)


@pytest.mark.parametrize("empty", ["nodes", "relations"])
def test_empty_graph_is_a_clear_error(empty: str) -> None:
    nodes, relations = fixture_graph()
    if empty == "nodes":
        nodes = nodes.clear()
    else:
        relations = relations.clear()
    with pytest.raises(GraphInputError, match="knowledge graph is empty.*materialize kg_nodes"):
        expand_templates(nodes, relations, shipped_catalogue())


def test_relation_to_a_missing_node_is_named() -> None:
    nodes, relations = fixture_graph()
    nodes = nodes.filter(pl.col("node_id") != "K3")
    with pytest.raises(GraphInputError, match=r"relation R11 \(AFFECTS\) points to missing node K3"):
        expand_templates(nodes, relations, shipped_catalogue())


def test_unknown_category_is_named() -> None:
    nodes, relations = fixture_graph()
    nodes = nodes.with_columns(
        pl.when(pl.col("node_id") == "K7")
        .then(pl.lit("Sabo"))
        .otherwise(pl.col("category"))
        .alias("category")
    )
    with pytest.raises(GraphInputError, match=r"node K7 \(除石\) has category 'Sabo'"):
        expand_templates(nodes, relations, shipped_catalogue())


def test_missing_graph_column_is_named() -> None:
    nodes, relations = fixture_graph()
    with pytest.raises(GraphInputError, match=r"kg.nodes lacks column\(s\) volume"):
        expand_templates(nodes.drop("volume"), relations, shipped_catalogue())


# ----------------------------------------------------------------------------------------- expansion


def test_expansion_fills_every_template_with_node_facts_and_citations() -> None:
    nodes, relations = fixture_graph()
    catalogue = shipped_catalogue()
    frame, report = expand_templates(nodes, relations, catalogue)
    expected = sum(catalogue.template_count[t] for t in relations["relation_type"].to_list())
    assert frame.height == report.pairs == expected
    assert frame["qa_id"].n_unique() == frame.height
    assert not frame["question"].str.contains(r"\{|\}").any()
    assert not frame["answer"].str.contains(r"\{|\}").any()

    affects = frame.filter(pl.col("relation_id") == "R11")
    assert affects.height == catalogue.template_count["AFFECTS"]
    # Every answer states the fact with both names, the node descriptions and the standards locations.
    for answer in affects["answer"].to_list():
        assert "「洪水」" in answer and "「堤防」" in answer
        assert "洪水について定めた事項" in answer
        assert "「設計編 第3章 河川構造物 第2節 堤防」" in answer
    assert affects["citation"][0] == "「計画編」「設計編 第3章 河川構造物 第2節 堤防」"
    assert affects["node_ids"][0].to_list() == ["K3", "K1"]
    assert affects["category"].unique().to_list() == ["Hazard"]  # category_from: source
    # HAS_CHAPTER takes the chapter's category (category_from: target).
    assert frame.filter(pl.col("relation_id") == "R02")["category"].unique().to_list() == ["Design"]
    assert set(frame["template_version"].unique()) == {"v1", "v2", "v3", "v4"}


def test_citation_and_sentence_helpers() -> None:
    assert citation_of("設計編", "第3章 河川構造物", None) == "「設計編 第3章 河川構造物」"
    assert citation_of(None, None, None) == ""
    assert qa_generation.as_sentence("説明文") == "説明文。"
    assert qa_generation.as_sentence("説明文。") == "説明文。"
    citation = "「計画編」「設計編 第3章 河川構造物 第2節 堤防」"
    assert qa_generation.cites_a_location("根拠は「設計編 第3章 河川構造物 第2節 堤防」です。", citation)
    assert not qa_generation.cites_a_location("根拠は「設計編 第3章」です。", citation)


def test_column_and_text_normalization_agree() -> None:
    samples = ["ＡＢＣ（テスト）　全角 ｶﾅ", "「堤防」の 高さ\nは？", "Ｈ－Ｑ式", "Ⅳとⅱ", "①号"]
    by_column = pl.DataFrame({"text": samples}).select(qa_generation.normalized("text"))["text"].to_list()
    assert by_column == [qa_generation.normalize_text(text) for text in samples]
    assert by_column[0] == "abc(テスト)全角カナ"


def test_pool_version_depends_only_on_graph_and_templates() -> None:
    nodes, relations = fixture_graph()
    catalogue = shipped_catalogue()

    def version(n: pl.DataFrame, r: pl.DataFrame, c: TemplateCatalogue) -> str:
        frame, _ = expand_templates(n, r, c)
        return frame_version(deduplicate(frame, c)[0])

    base = version(nodes, relations, catalogue)
    # Same graph in another row order: same pool, same version.
    assert version(nodes.reverse(), relations.sample(fraction=1.0, shuffle=True, seed=3), catalogue) == base
    # The graph changes: another version.
    edited = nodes.with_columns(pl.col("description").str.replace("試験用", "検証用"))
    assert version(edited, relations, catalogue) != base
    # A template changes: another version.
    raw = raw_catalogue()
    raw["relation_types"]["MITIGATES"]["templates"][0]["question"] = "「{source_name}」は何を防ぎますか。"
    assert version(nodes, relations, parse_catalogue(raw)) != base


# --------------------------------------------------------------------------------------------- dedup


def _pairs(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "qa_id": [r[0] for r in rows],
            "relation_id": [r[0].split(":")[0] for r in rows],
            "template_id": [r[0].split(":")[1] for r in rows],
            "question": [r[1] for r in rows],
            "answer": [r[2] for r in rows],
        }
    )


def test_dedup_removes_exact_and_near_duplicates_but_keeps_distinct_facts() -> None:
    answer = "「堤防」は「計画高水位」を基準に高さを定めます。" * 6
    other_answer = "「堤防」の天端幅は点検や水防活動の通路として必要な幅を確保します。" * 6
    frame = _pairs(
        [
            ("R1:T.q01", "「堤防」の高さは何を基準に決めますか。", answer),
            # The same question once spaces are removed: an exact duplicate, whatever its answer.
            ("R1:T.q02", "「堤防」の高さは 何を基準に決めますか。", answer + "補足。"),
            # One comma more, same answer: a near duplicate.
            ("R1:T.q03", "「堤防」の高さは、何を基準に決めますか。", answer),
            # A similar question about another fact, with another answer: kept.
            ("R2:T.q01", "「堤防」の天端幅は何を基準に決めますか。", other_answer),
            ("R3:T.q01", "「護岸」の構造を説明してください。", "「護岸」は法面を保護します。" * 8),
        ]
    )
    result, report = deduplicate(frame, shipped_catalogue())
    assert report.exact_removed == 1
    assert report.near_removed == 1
    assert report.examples[0]["dropped"] == "R1:T.q03" and report.examples[0]["kept"] == "R1:T.q01"
    assert sorted(result["qa_id"].to_list()) == ["R1:T.q01", "R2:T.q01", "R3:T.q01"]
    assert report.output_pairs == result.height


# ------------------------------------------------------------------------------------ the seed graph


def test_seed_pool_matches_the_papers_size_and_shares() -> None:
    nodes, relations = seed_graph()
    catalogue = shipped_catalogue()
    raw, _ = expand_templates(nodes, relations, catalogue)
    pool, report = deduplicate(raw, catalogue)
    paper = catalogue.paper_reference
    assert abs(pool.height / paper.pool_size - 1) < 0.01, pool.height
    shares = qa_generation.relation_shares(pool, paper.counts)
    assert shares["delta_pp"].abs().max() < 0.5
    assert report.exact_removed > 0  # single-node questions repeat across relations of one node
    # Answers of comparable substance to the paper's 370-380 characters, not one-liners.
    assert 365 <= pool["answer_chars"].mean() <= 395
    assert pool["answer_chars"].min() >= 200
    cited = [qa_generation.cites_a_location(a, c) for a, c in pool.select("answer", "citation").iter_rows()]
    assert all(cited)
    assert set(pool["category"].unique()) == set(catalogue.categories)
