"""Stage 3's table shapes and identifying columns (plain data shared by its assets and by judging)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from jpslm_assets import settings

GROUP = "export"


PARTITION_COLUMN = "adapter"  # the stage-3 partition key, in every stage-3 table


GGUF_FORMATS = ("f16", "q4_k_m")  # the llama.cpp formats this stage exports


NLL_TOLERANCE = 0.01  # F16 GGUF NLL within 1% of the HF model's


Q4_SIZE_LIMIT = 0.40  # Q4_K_M at most 40% of F16 where K-quants apply


EMPTY_ARTIFACT = {"artifact_path": None, "artifact_bytes": None, "artifact_sha256": None}


def export_folder(adapter: str, n: int) -> Path:
    folder = settings.artifact_dir() / "export" / adapter / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# Explicit types: a failed conversion leaves most columns NULL, and the first write fixes the table's types.
GGUF_SCHEMA = {
    "adapter": pl.String, "stage": pl.Int64, "model": pl.String, "n": pl.Int64, "format": pl.String, "status": pl.String, "failure_kind": pl.String,
    "failure_reason": pl.String, "tensor_types": pl.String, "kquant_compatible": pl.Boolean, "file_bytes": pl.Int64,
    "size_ratio_to_f16": pl.Float64, "seconds": pl.Float64, "hf_nll": pl.Float64, "gguf_nll": pl.Float64,
    "nll_rel_diff": pl.Float64, "answer_tokens": pl.Int64, "fidelity_questions": pl.Int64,
    "tokenizer_agreement": pl.Float64, "tokenizer_texts": pl.Int64, "tokenizer_first_mismatch": pl.String,
    "artifact_path": pl.String, "artifact_bytes": pl.Int64, "artifact_sha256": pl.String,
}  # fmt: skip


DEPLOYMENT_SCHEMA = {
    "adapter": pl.String, "stage": pl.Int64, "model": pl.String, "n": pl.Int64, "format": pl.String,
    "backend": pl.String, "served_name": pl.String, "model_ref": pl.String, "quantization": pl.String,
    "modelfile_path": pl.String, "status": pl.String, "detail": pl.String,
}  # fmt: skip


ANSWER_SCHEMA = {
    "adapter": pl.String, "stage": pl.Int64, "model": pl.String, "n": pl.Int64, "format": pl.String,
    "question_id": pl.String, "category": pl.String, "question": pl.String, "answer": pl.String, "chars": pl.Int64,
    "tokens": pl.Int64, "prompt_tokens": pl.Int64, "seconds": pl.Float64, "backend": pl.String,
    "quantization": pl.String, "model_ref": pl.String, "finish_reason": pl.String, "seed": pl.Int64,
    "temperature": pl.Float64, "max_new_tokens": pl.Int64,
}  # fmt: skip
