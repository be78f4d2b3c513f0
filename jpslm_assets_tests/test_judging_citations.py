"""Citation grounding without an LLM: reading volume / chapter / section citations and checking them."""

from __future__ import annotations

import json
from importlib import resources

import polars as pl
import pytest

from jpslm_assets.judging import citations
from jpslm_assets.judging.rubric import JudgeInputError, load_rubric

READER = citations.CitationReader(load_rubric().citation)
LEVEE = READER.expected_location(
    [{"volume": "設計編", "chapter": "第3章 河川構造物の設計", "section": "第1節 堤防"}],
    fallback_citation=None,
)
RIVER_INSPECTION = READER.expected_location(
    [{"volume": "維持管理編（河川編）", "chapter": "第2章 河川の点検", "section": "第1節 堤防点検"}], None
)


@pytest.mark.parametrize(
    ("text", "number"), [("三", 3), ("十", 10), ("十二", 12), ("二十", 20), ("百五", 105), ("７", 7)]
)
def test_kanji_and_full_width_numbers(text: str, number: int) -> None:
    assert citations.kanji_number(text) == number


def test_expected_location_reads_numbers_and_titles_from_the_graph() -> None:
    assert LEVEE.volumes == {"設計編"} and LEVEE.chapters == {"3"} and LEVEE.sections == {"1"}
    assert LEVEE.chapter_titles == {"河川構造物の設計"}
    assert LEVEE.text == "設計編 > 第3章 河川構造物の設計 > 第1節 堤防"


@pytest.mark.parametrize(
    ("answer", "cites", "matches", "level"),
    [
        ("設計編第3章第1節の規定により天端幅を定める。", True, True, "section"),
        ("設計編 第三章 第一節による。", True, True, "section"),
        ("Design Volume, Chapter 3 sets the crest width.", True, True, "chapter"),
        ("「河川構造物の設計」の章に従う。", True, True, "chapter"),
        ("設計編に規定がある。", True, True, "volume"),
        ("調査編第3章第1節による。", True, False, "none"),  # right numbers, wrong volume
        ("設計編第5章第1節による。", True, False, "none"),  # wrong chapter makes the section moot
        (
            "河川構造物の設計では天端幅を計画高水流量で決める。",
            False,
            False,
            "none",
        ),  # a topic word is no citation
        ("", False, False, "none"),
    ],
)
def test_grounding_of_answers(answer: str, cites: bool, matches: bool, level: str) -> None:
    grounding = READER.ground(answer, LEVEE)
    assert (grounding.cites_location, grounding.citation_matches, grounding.match_level) == (
        cites,
        matches,
        level,
    )


def test_maintenance_parts_are_told_apart_and_the_bare_volume_matches_any_part() -> None:
    assert READER.ground("維持管理編（河川編）第2章第1節", RIVER_INSPECTION).match_level == "section"
    assert (
        READER.ground("維持管理編(河川編)第2章", RIVER_INSPECTION).match_level == "chapter"
    )  # ASCII brackets
    assert READER.ground("維持管理編の第2章", RIVER_INSPECTION).citation_matches is True
    wrong_part = READER.ground("維持管理編（ダム編）第2章", RIVER_INSPECTION)
    assert wrong_part.citation_matches is False and "ダム編" in wrong_part.notes[0]


def test_question_without_location_is_unverifiable_not_wrong() -> None:
    unknown = READER.expected_location([{"volume": None, "chapter": None, "section": None}], None)
    grounding = READER.ground("設計編第3章", unknown)
    assert (
        grounding.cites_location and grounding.citation_matches is None and grounding.match_level == "unknown"
    )


def test_test_set_citation_is_the_fallback_location() -> None:
    expected = READER.expected_location([], "「計画編 第7章 危機管理・警戒避難計画 第2節 警戒避難体制」")
    assert expected.volumes == {"計画編"} and expected.chapters == {"7"} and expected.sections == {"2"}
    assert READER.ground("計画編第7章第2節", expected).match_level == "section"


def test_every_packaged_graph_volume_is_known_to_the_rubric() -> None:
    text = (resources.files("jpslm_assets") / "data" / "kg" / "nodes.jsonl").read_text("utf-8")
    volumes = {json.loads(line)["volume"] for line in text.splitlines() if line.strip()}
    assert volumes and volumes <= set(load_rubric().citation.volumes)


def test_ground_answers_frame_and_unknown_question() -> None:
    test_set = pl.DataFrame(
        {
            "question_id": ["Q1"],
            "category": ["Design"],
            "node_ids": [["N-1"]],
            "citation": ["「設計編 第3章」"],
        }
    )
    nodes = pl.DataFrame(
        {"node_id": ["N-1"], "volume": ["設計編"], "chapter": ["第3章 河川構造物の設計"], "section": [None]}
    )
    answers = pl.DataFrame({"question_id": ["Q1"], "answer": ["設計編第3章のとおり"]})
    frame = citations.ground_answers(answers, test_set, nodes, load_rubric().citation, "answers")
    assert frame.schema == pl.Schema(citations.CITATION_GROUNDING_SCHEMA)
    row = frame.row(0, named=True)
    assert row["cites_location"] and row["citation_matches"] and row["match_level"] == "chapter"
    assert (
        row["cited_volumes"] == ["設計編"] and row["cited_chapters"] == ["3"] and row["category"] == "Design"
    )
    with pytest.raises(JudgeInputError, match=r"\['Q9'\] that are not in qa.test_set"):
        citations.ground_answers(
            pl.DataFrame({"question_id": ["Q9"], "answer": ["x"]}),
            test_set,
            nodes,
            load_rubric().citation,
            "answers",
        )
