"""Optional LLM rephrasing: acceptance rules, prompt hashing, and the cache that prevents repeated calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pytest

from jpslm_assets.common.generation_types import GenerationError, GenerationRequest, GenerationResult
from jpslm_assets.qa import generation as qa_generation
from jpslm_assets.qa.rephrase import build_request, judge_rephrase, prompt_hash, rephrase_pool
from jpslm_assets_tests.test_qa_generation import fixture_graph, shipped_catalogue


def fake_rewrite(question: str) -> str:
    """What the counting fake answers: a polite rewording when it can, else the question unchanged."""
    return "言い換え：" + question.replace("ですか。", "でしょうか。")


@dataclass
class CountingGenerator:
    fail_after: int | None = None
    prompts: list[str] = field(default_factory=list)

    def __call__(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise GenerationError(f"fake backend, model {model_ref}: stopped after {self.fail_after} calls")
        question = request.messages[-1]["content"].split("質問：", 1)[1]
        self.prompts.append(question)
        return GenerationResult(
            text=fake_rewrite(question),
            prompt_tokens=10,
            completion_tokens=12,
            seconds=0.01,
            finish_reason="stop",
            backend="fake",
            model=model_ref,
        )


def fixture_pool() -> pl.DataFrame:
    nodes, relations = fixture_graph()
    catalogue = shipped_catalogue()
    raw, _ = qa_generation.expand_templates(nodes, relations, catalogue)
    return qa_generation.deduplicate(raw, catalogue)[0]


def run(pool: pl.DataFrame, generate: CountingGenerator, cache: dict[str, str], **kwargs: Any):
    flushed: list[list[dict[str, Any]]] = []
    options = {"versions": ["v1", "v2", "v3", "v4"], "limit": None, "temperature": 0.0, "seed": 42}
    options.update(kwargs)
    result = rephrase_pool(
        pool,
        model_ref="fake-model",
        settings=shipped_catalogue().rephrase,
        generate=generate,
        cache=cache,
        flush=flushed.append,
        flush_every=10,
        **options,
    )
    return result, flushed


def test_acceptance_rules() -> None:
    original = "「堤防」の高さは何を基準に決めますか。"
    assert judge_rephrase(original, "言い換え：「堤防」の高さは何で決まるのでしょうか。", 2.5) == (
        "「堤防」の高さは何で決まるのでしょうか。",
        "accepted",
    )
    assert judge_rephrase(original, "   \n", 2.5) == (None, "empty")
    assert judge_rephrase(original, original, 2.5) == (None, "unchanged")
    assert judge_rephrase(original, "堤防の高さの決め方は？", 2.5)[1] == "accepted"  # named, quotes optional
    assert judge_rephrase(original, "高さの決め方は？", 2.5) == (None, "lost_term:堤防")
    assert judge_rephrase(original, "「堤防」" + "とても" * 40, 2.5)[1] == "too_long"


def test_prompt_hash_covers_model_and_sampling() -> None:
    settings = shipped_catalogue().rephrase
    request = build_request("「堤防」とは何ですか。", settings, temperature=0.0, seed=42)
    assert prompt_hash("m", request) == prompt_hash(
        "m", build_request("「堤防」とは何ですか。", settings, 0.0, 42)
    )
    assert prompt_hash("m", request) != prompt_hash("other", request)
    assert prompt_hash("m", request) != prompt_hash(
        "m", build_request("「堤防」とは何ですか。", settings, 0.7, 42)
    )
    assert (
        request.messages[0]["role"] == "system" and "「堤防」とは何ですか。" in request.messages[1]["content"]
    )


def test_rephrasing_replaces_questions_and_keeps_answers() -> None:
    pool = fixture_pool()
    generator = CountingGenerator()
    (result, stats), flushed = run(pool, generator, {}, versions=["v1"])
    selected = pool.filter(pl.col("template_version") == "v1")
    assert stats.selected == selected.height == stats.model_calls == len(generator.prompts)
    assert stats.cache_hits == 0
    changed = result.filter(pl.col("rephrased"))
    assert changed.height == stats.accepted > 0
    assert stats.accepted + sum(stats.rejected.values()) == stats.selected
    assert stats.rejected.get("unchanged", 0) > 0  # questions without "ですか。" come back as they were
    # Answers, ids and order are untouched; the original question is kept beside the new one.
    assert result["qa_id"].to_list() == pool["qa_id"].to_list()
    assert result["answer"].to_list() == pool["answer"].to_list()
    row = changed.row(0, named=True)
    assert row["question"] == row["original_question"].replace("ですか。", "でしょうか。")
    assert row["question_chars"] == len(row["question"])
    assert result.filter(~pl.col("rephrased"))["original_question"].is_null().all()
    # New outputs were handed out in batches of ten, and all of them.
    assert sum(len(batch) for batch in flushed) == stats.model_calls
    assert max(len(batch) for batch in flushed) == 10


def test_cache_means_no_second_call_for_the_same_prompt() -> None:
    pool = fixture_pool()
    first = CountingGenerator()
    (result, _), flushed = run(pool, first, {}, limit=25)
    cache = {row["prompt_hash"]: row["output"] for batch in flushed for row in batch}
    assert len(cache) == 25

    again = CountingGenerator()
    (result_again, stats), flushed_again = run(pool, again, cache, limit=25)
    assert again.prompts == [] and stats.cache_hits == 25 and flushed_again == []
    assert result_again.equals(result)

    # A larger limit calls the model only for the prompts not seen before.
    more = CountingGenerator()
    (_, stats), _ = run(pool, more, cache, limit=40)
    assert stats.model_calls == len(more.prompts) == 15 and stats.cache_hits == 25


def test_an_interrupted_run_keeps_what_it_already_paid_for() -> None:
    pool = fixture_pool()
    failing = CountingGenerator(fail_after=23)
    flushed: list[list[dict[str, Any]]] = []
    with pytest.raises(GenerationError, match="stopped after 23 calls"):
        rephrase_pool(
            pool,
            model_ref="fake-model",
            settings=shipped_catalogue().rephrase,
            generate=failing,
            cache={},
            versions=["v1", "v2", "v3", "v4"],
            limit=None,
            temperature=0.0,
            seed=42,
            flush=flushed.append,
            flush_every=10,
        )
    # Two full batches reached the cache before the failure; the third (3 outputs) was in flight.
    assert [len(batch) for batch in flushed] == [10, 10]
