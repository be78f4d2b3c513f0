"""The training stages' table names, groups and row typing (plain data, shared by their assets)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

TRAINING_GROUP = "training"


EVALUATION_GROUP = "evaluation"


LOSS_CURVE_TABLE = "train.loss_curve"


SCALE_CURVE_TABLE = "eval.scale_curve"


OPTIMAL_SCALE_TABLE = "eval.optimal_scale"


RUNS_TABLES = {1: "train.stage1_runs", 2: "train.stage2_runs"}


TEST_NLL_TABLES = {1: "eval.stage1_test_nll", 2: "eval.stage2_test_nll"}


EVAL_MAX_TOKENS = 2048  # test answers are scored whole, up to this many tokens (or the model's context)


# Columns that can be null in one partition and set in another: typed up front, so the first partition
# written does not fix a Null/int type in DuckDB that a later partition's string would not fit.
NULLABLE_TYPES: dict[str, Any] = {
    "hf_id": pl.Utf8,
    "revision": pl.Utf8,
    "paper_attention_label": pl.Utf8,
    "matches_paper_label": pl.Boolean,
    "model_type": pl.Utf8,
    "intermediate_size": pl.Int64,
    "max_position_embeddings": pl.Int64,
    "seed": pl.Int64,
    "stage": pl.Int64,
    "max_steps": pl.Int64,
    "resumed_from_step": pl.Int64,
    "chat_template": pl.Utf8,
    "end_of_turn": pl.Utf8,
    "question_nll": pl.List(pl.Float64),
    "question_answer_tokens": pl.List(pl.Int64),
}


def row_frame(row: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame([row], schema_overrides={k: v for k, v in NULLABLE_TYPES.items() if k in row})


def digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
