"""The held-out test set file: parsing errors, graph grounding, composition and lexical leakage."""

from __future__ import annotations

import json

import polars as pl
import pytest

from jpslm_assets.qa import generation as qa_generation
from jpslm_assets.qa import held_out as qa_test_set
from jpslm_assets.qa.held_out import TestSetError, lexical_leakage, parse_test_set, reference_overlap
from jpslm_assets_tests.test_qa_generation import DATA, seed_graph, shipped_catalogue

TEST_SET = DATA / "test_set_200.jsonl"


def _line(**overrides: object) -> str:
    record = {
        "question_id": "TS-901",
        "category": "Design",
        "question": "堤防の高さはどう決めるのか。",
        "reference_answer": "計画高水位に余裕高を加えて決める。",
        "node_ids": ["N-143"],
        "citation": "「設計編 第3章 河川構造物の設計 第2節 堤防」",
        "human_written": True,
    }
    record.update(overrides)
    return json.dumps({k: v for k, v in record.items() if v is not None}, ensure_ascii=False)


def categories() -> list[str]:
    return shipped_catalogue().categories


def test_missing_category_names_the_line_and_question() -> None:
    text = "\n".join([_line(), _line(question_id="TS-902", category=None)])
    with pytest.raises(
        TestSetError, match=r"test_set_200\.jsonl line 2 \(question TS-902\): missing 'category'"
    ):
        parse_test_set(text, categories())


def test_duplicate_id_names_both_lines() -> None:
    text = "\n".join([_line(), _line(question_id="TS-902"), _line()])
    with pytest.raises(TestSetError, match=r"line 3: duplicate question_id TS-901 \(first used on line 1\)"):
        parse_test_set(text, categories())


def test_unknown_category_bad_json_and_bad_fields_are_reported() -> None:
    with pytest.raises(TestSetError, match=r"line 1 \(question TS-901\): category 'Dams' is not one of"):
        parse_test_set(_line(category="Dams"), categories())
    with pytest.raises(TestSetError, match=r"line 2: not valid JSON"):
        parse_test_set(_line() + "\n{broken", categories())
    with pytest.raises(TestSetError, match=r"line 1 \(question TS-901\): node_ids"):
        parse_test_set(_line(node_ids=[]), categories())
    with pytest.raises(TestSetError, match="holds no questions"):
        parse_test_set("\n\n", categories())


def test_unknown_node_ids_are_named() -> None:
    frame = parse_test_set(_line(node_ids=["N-143", "N-999"]), categories())
    with pytest.raises(
        TestSetError, match=r"line 1 \(question TS-901\): node id\(s\) N-999 are not in kg.nodes"
    ):
        qa_test_set.check_against_graph(frame, ["N-143"])


def test_leakage_finds_shared_ngrams_after_normalization() -> None:
    test = pl.DataFrame(
        {
            "question_id": ["A", "B"],
            "question": ["堤防の天端幅は何を考慮して決めるのか。", "ABC の定義を教えてほしい。"],
        }
    )
    training = pl.DataFrame(
        {
            "qa_id": ["x", "y"],
            "question": ["「堤防」の 天端幅は 何を決めるか", "ａｂｃの定義を教えてください。"],
        }
    )
    # B shares 「abcの定義を教えて」 (10 chars) only once full-width letters, case and spaces are normalized;
    # A shares 「の天端幅は何を」 (7 chars), below the 8-gram threshold.
    report = lexical_leakage(test, training, ngram_chars=8)
    assert report.leaking_questions == ["B"] and not report.passed
    assert report.longest_common_chars == 10
    assert report.longest_common_text == "abcの定義を教えて"
    assert (report.longest_test_id, report.longest_training_id) == ("B", "y")
    only_a = lexical_leakage(test.head(1), training, ngram_chars=8)
    assert (
        only_a.passed and only_a.longest_common_chars == 7 and only_a.longest_common_text == "の天端幅は何を"
    )
    assert lexical_leakage(test.head(1), training, ngram_chars=7).leaking_questions == ["A"]


def test_shipped_test_set_is_complete_and_grounded() -> None:
    catalogue = shipped_catalogue()
    frame = parse_test_set(TEST_SET.read_text(encoding="utf-8"), catalogue.categories)
    nodes, _ = seed_graph()
    qa_test_set.check_against_graph(frame, nodes["node_id"].to_list())
    assert frame.height == catalogue.test_set.questions == 200
    assert frame["human_written"].sum() == catalogue.test_set.human_written == 100
    per_category = frame.group_by("category").agg(pl.len(), pl.col("human_written").sum())
    assert per_category.height == 8
    assert (per_category["len"] == 25).all()
    assert (per_category["human_written"] >= 12).all()
    # Every reference answer ends by citing the locations of the nodes it rests on.
    locations = {
        row["node_id"]: qa_generation.citation_of(row["volume"], row["chapter"], row["section"])
        for row in nodes.iter_rows(named=True)
    }
    for row in frame.iter_rows(named=True):
        assert row["citation"] in row["reference_answer"]
        assert all(locations[node] in row["citation"] for node in row["node_ids"]), row["question_id"]


def test_shipped_test_set_shares_no_8gram_with_any_template_question() -> None:
    """Against every expanded question (before dedup and rebalancing): a superset of every subset."""
    catalogue = shipped_catalogue()
    nodes, relations = seed_graph()
    raw, _ = qa_generation.expand_templates(nodes, relations, catalogue)
    frame = parse_test_set(TEST_SET.read_text(encoding="utf-8"), catalogue.categories)
    report = lexical_leakage(frame, raw, catalogue.test_set.ngram_chars)
    assert report.passed, report.leaking_questions
    assert report.longest_common_chars < catalogue.test_set.ngram_chars
    assert report.training_questions == raw.height


def test_reference_overlap_masks_citations_and_finds_the_longest_verbatim_run() -> None:
    clause = "堤防の点検は出水期の前と後に行い、損傷の位置と程度を記録して補修の優先順位を決める"  # 40 characters
    cite = "「維持管理編 第3章 河川管理施設 第1節 堤防」"
    test = pl.DataFrame(
        {
            "question_id": ["COPY", "CITE", "OWN"],
            "human_written": [True, True, False],
            "reference_answer": [
                f"要点として、{clause}。出典：{cite}。",
                f"点検の結果は台帳にまとめます。出典：{cite}。",
                "砂防堰堤の水抜き暗渠は土砂で塞がれやすいため定期的に清掃する。",
            ],
            "citation": [cite, cite, "「砂防編 第2章」"],
        }
    )
    training = pl.DataFrame(
        {
            "qa_id": ["T1", "T2"],
            "answer": [f"実務では{clause}ことが求められます。出典は{cite}です。", f"詳しくは{cite}を参照してください。"],
            "citation": [cite, cite],
        }
    )
    rows = {r["question_id"]: r for r in reference_overlap(test, training, run_chars=30).iter_rows(named=True)}
    copied = rows["COPY"]
    assert copied["repeats_training"] and copied["training_id"] == "T1"
    assert copied["longest_run_chars"] == len(clause) and copied["longest_run_text"] == clause
    # The citation alone is long, yet it is masked: quoting the location is what answers are asked to do.
    cited = rows["CITE"]
    assert not cited["repeats_training"] and cited["longest_run_chars"] < 8
    assert cited["longest_run_chars_unmasked"] >= len("維持管理編第3章河川管理施設第1節堤防")
    own = rows["OWN"]
    assert own["longest_run_chars"] == 0 and own["training_id"] is None and own["shared_8gram_share"] == 0.0
    assert rows["COPY"]["shared_8gram_share"] > 0.5
    # A limit above the run reports it without flagging it.
    assert not reference_overlap(test, training, run_chars=len(clause) + 1)["repeats_training"].any()
    with pytest.raises(TestSetError, match="training answer"):
        reference_overlap(test, training.drop("answer"), run_chars=30)


def test_shipped_references_overlap_report_is_stable() -> None:
    """The shipped test set against every expanded answer: the figures docs/judging.md quotes."""
    catalogue = shipped_catalogue()
    nodes, relations = seed_graph()
    raw, _ = qa_generation.expand_templates(nodes, relations, catalogue)
    frame = parse_test_set(TEST_SET.read_text(encoding="utf-8"), catalogue.categories)
    report = reference_overlap(frame, raw, catalogue.test_set.reference_run_chars).filter("human_written")
    assert report.height == 100
    assert report["longest_run_chars_unmasked"].max() == 69  # a citation
    assert report["longest_run_chars"].max() == 58
    assert report["repeats_training"].sum() == 18
