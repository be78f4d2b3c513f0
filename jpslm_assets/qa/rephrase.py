"""Optional LLM rephrasing of template questions, cached by prompt hash.

Only questions are rephrased; answers keep the template's facts and citations. A rephrasing is accepted
when it is non-empty, different from the original, not much longer, and still names every term the
original quoted in 「」 (the node names), so the fact asked about cannot drift. The cache maps the hash of
(model, full request) to the raw model output; a re-run looks the hash up first and never calls the model
twice for the same prompt, whether or not the earlier output was accepted.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import polars as pl

from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.qa.templates import RephraseSettings

QUOTED_TERM = re.compile(r"「([^「」]+)」")
_LEADING_LABEL = re.compile(r"^(?:言い換え|質問|Question|Q)\s*[:：]\s*", re.IGNORECASE)

CACHE_SCHEMA: dict[str, Any] = {
    "prompt_hash": pl.String,
    "model": pl.String,
    "prompt": pl.String,
    "output": pl.String,
    "completion_tokens": pl.Int64,
    "seconds": pl.Float64,
    "created_at": pl.Datetime(time_zone="UTC"),
}

Generate = Callable[[str, GenerationRequest], GenerationResult]


def build_request(
    question: str, settings: RephraseSettings, temperature: float, seed: int
) -> GenerationRequest:
    return GenerationRequest(
        messages=[
            {"role": "system", "content": settings.system_prompt},
            {"role": "user", "content": settings.user_prompt.replace("{question}", question)},
        ],
        max_tokens=settings.max_tokens,
        temperature=temperature,
        seed=seed,
    )


def prompt_hash(model_ref: str, request: GenerationRequest) -> str:
    """A stable hash of everything that determines the output: model, messages and sampling settings."""
    payload = {"model": model_ref, **asdict(request)}
    payload.pop("deadline_s", None)  # a time budget, not an input of the output
    encoded = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def clean_output(text: str) -> str:
    """The first non-empty line, without a leading label or wrapping quotes."""
    for line in text.strip().splitlines():
        line = _LEADING_LABEL.sub("", line.strip()).strip().strip("\"'“”")
        if line:
            return line
    return ""


def judge_rephrase(original: str, output: str, max_length_ratio: float) -> tuple[str | None, str]:
    """(accepted question or None, reason) for one model output."""
    candidate = clean_output(output)
    if not candidate:
        return None, "empty"
    if candidate == original:
        return None, "unchanged"
    if len(candidate) > max_length_ratio * len(original):
        return None, "too_long"
    missing = [term for term in QUOTED_TERM.findall(original) if term not in candidate]
    if missing:
        return None, f"lost_term:{missing[0]}"
    return candidate, "accepted"


@dataclass
class RephraseStats:
    selected: int = 0
    cache_hits: int = 0
    model_calls: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def rephrase_pool(
    pool: pl.DataFrame,
    *,
    model_ref: str,
    settings: RephraseSettings,
    generate: Generate,
    cache: Mapping[str, str],
    versions: Sequence[str],
    limit: int | None,
    temperature: float,
    seed: int,
    flush: Callable[[list[dict[str, Any]]], None],
    flush_every: int = 25,
) -> tuple[pl.DataFrame, RephraseStats]:
    """Rephrase the questions of ``versions`` (at most ``limit``, in qa_id order) and return the new pool.

    ``cache`` maps prompt hash to output; new outputs are handed to ``flush`` in batches as they arrive, so
    an interrupted run keeps what it paid for.
    """
    stats = RephraseStats()
    ordered = pool.sort("qa_id")
    selected = ordered.filter(pl.col("template_version").is_in(list(versions)))
    if limit is not None:
        selected = selected.head(limit)
    stats.selected = selected.height
    known = dict(cache)
    pending: list[dict[str, Any]] = []
    replacements: dict[str, str] = {}
    for qa_id, question in selected.select("qa_id", "question").iter_rows():
        request = build_request(question, settings, temperature, seed)
        key = prompt_hash(model_ref, request)
        if key in known:
            stats.cache_hits += 1
            output = known[key]
        else:
            result = generate(model_ref, request)
            stats.model_calls += 1
            output = result.text
            known[key] = output
            pending.append(
                {
                    "prompt_hash": key,
                    "model": model_ref,
                    "prompt": json.dumps(request.messages, ensure_ascii=False),
                    "output": output,
                    "completion_tokens": int(result.completion_tokens),
                    "seconds": float(result.seconds),
                    "created_at": datetime.now(timezone.utc),
                }
            )
            if len(pending) >= flush_every:
                flush(pending)
                pending = []
        accepted, reason = judge_rephrase(question, output, settings.max_length_ratio)
        if accepted is None:
            bucket = reason.split(":", 1)[0]
            stats.rejected[bucket] = stats.rejected.get(bucket, 0) + 1
        else:
            stats.accepted += 1
            replacements[qa_id] = accepted
    if pending:
        flush(pending)
    if not replacements:
        return pool, stats
    mapping = pl.DataFrame(
        {"qa_id": list(replacements), "_new_question": list(replacements.values())},
        schema={"qa_id": pl.String, "_new_question": pl.String},
    )
    updated = (
        pool.join(mapping, on="qa_id", how="left")
        .with_columns(
            pl.col("_new_question").is_not_null().alias("rephrased"),
            pl.when(pl.col("_new_question").is_not_null())
            .then(pl.col("question"))
            .otherwise(pl.col("original_question"))
            .alias("original_question"),
            pl.coalesce("_new_question", "question").alias("question"),
        )
        .with_columns(pl.col("question").str.len_chars().cast(pl.Int64).alias("question_chars"))
        .drop("_new_question")
    )
    return updated.select(pool.columns), stats
