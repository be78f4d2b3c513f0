"""Stage 3, serving: the deployment (an Ollama Modelfile, or the embedded llama.cpp deployment) and the answers to the evaluation questions per format.

No ``from __future__ import annotations`` here: Dagster reads the real annotations of asset parameters."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets.catalogue import model_entry
from jpslm_assets.code_versions import versioned
from jpslm_assets.common.generation_types import GenerationError, GenerationResult
from jpslm_assets.common.progress import ProgressLogger
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.export.answering import (
    AnsweringInputError,
    QuestionFailed,
    answer_questions,
    select_eval_questions,
    served_name,
)
from jpslm_assets.export.assets_partition import adapter_columns, partition_adapter, stage3_metadata
from jpslm_assets.export.modelfile import ChatTemplateError, build_modelfile
from jpslm_assets.export.tables import ANSWER_SCHEMA, DEPLOYMENT_SCHEMA, GGUF_FORMATS, GROUP
from jpslm_assets.outputs import single_row, versioned_output
from jpslm_assets.partitions import (
    Stage3Adapter,
    stage3_partitions,
)
from jpslm_assets.resources.generation import Deployment, DeploymentRequest, GenerationBackend
from jpslm_assets.resources.generation_backends import serving_backend
from jpslm_assets.resources.llama_cpp_tools import (
    LlamaCppToolError,
    gguf_chat_metadata,
    partial_path,
    replace_atomically,
)
from jpslm_assets.resources.loaded_models import release_loaded_models
from jpslm_assets.settings import current_profile


def _deployment_row(
    adapter: Stage3Adapter, n: int, format_name: str, deployment: Deployment, modelfile: Path | None
) -> dict:
    return {
        **adapter_columns(adapter, n), "format": format_name, "backend": deployment.backend,
        "served_name": deployment.served_name, "model_ref": deployment.model_ref,
        "quantization": deployment.quantization, "modelfile_path": str(modelfile) if modelfile else None,
        "status": deployment.status, "detail": deployment.detail,
    }  # fmt: skip


def _write_modelfile(path: Path, text: str) -> Path:
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    replace_atomically(partial, path)
    return path


@versioned()
@dg.asset(
    group_name=GROUP,
    kinds={"ollama", "llama_cpp", "duckdb"},
    partitions_def=stage3_partitions(),
    ins={
        "merged_model": dg.AssetIn(key="merged_model"),
        "gguf_f16": dg.AssetIn(key="gguf_f16"),
        "gguf_q4_k_m": dg.AssetIn(key="gguf_q4_k_m"),
    },
    metadata=stage3_metadata("serve.deployments"),
)
def deployment(
    context: dg.AssetExecutionContext,
    generation: GenerationBackend,
    merged_model: pl.DataFrame,
    gguf_f16: pl.DataFrame,
    gguf_q4_k_m: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Each format made servable: a Modelfile from the model's chat template (stop tokens, fixed seed,
    temperature and context, no double BOS) and ``ollama create`` when the Ollama server answers, else the
    embedded llama.cpp deployment (with ``generation.backend: llama_server``, the GGUF checked for llama-server
    to serve). A model llama.cpp could not convert gets the HF + NF4 fallback as a row of its own, format
    ``nf4``, beside its unavailable GGUF formats."""
    adapter = partition_adapter(context)
    merged = single_row(merged_model, "merged_model", adapter=adapter.key)
    model, n = adapter.model, int(merged["n"])
    entry = model_entry(model)
    generation_settings = current_profile().generation
    rows = []
    for format_name, frame in zip(GGUF_FORMATS, (gguf_f16, gguf_q4_k_m), strict=True):
        gguf = single_row(frame, f"gguf_{format_name}", adapter=adapter.key)
        name = served_name(adapter.key, n, format_name)
        if gguf["status"] != "ok":
            unavailable = Deployment(
                "none", "", name, format_name, "unavailable", f"no {format_name} GGUF: {gguf['failure_reason']}"
            )
            rows.append(_deployment_row(adapter, n, format_name, unavailable, None))
            context.log.warning(f"{adapter.key} n={n} {format_name}: {rows[-1]['detail']}")
            if format_name == "f16":
                request = DeploymentRequest(
                    model, n, "nf4", served_name(adapter.key, n, "nf4"), hf_dir=Path(merged["artifact_path"])
                )
                rows.append(_deployment_row(adapter, n, "nf4", generation.deploy(request), None))
                context.log.warning(f"{adapter.key} n={n} nf4 fallback: {rows[-1]['status']} - {rows[-1]['detail']}")
            continue
        gguf_path = Path(gguf["artifact_path"])
        try:
            header = gguf_chat_metadata(gguf_path)  # read from the header: no weights loaded for this
            spec = build_modelfile(
                header.chat_template,
                gguf_path.name,
                model=f"{adapter.key} n={n} ({format_name})",
                bos_token=header.bos_token,
                eos_token=header.eos_token,
                server_adds_bos=header.add_bos,
                catalogue_stops=entry.stop_tokens,
                seed=generation_settings.seed,
                temperature=generation_settings.temperature,
                num_ctx=generation_settings.num_ctx,
                num_predict=generation_settings.max_new_tokens,
                comment=(
                    f"{name}: {model} stage-{adapter.stage} adapter, n={n}, {format_name}; written by the "
                    "deployment asset"
                ),
            )
            modelfile = _write_modelfile(gguf_path.with_name(f"Modelfile.{format_name}"), spec.render())
            request = DeploymentRequest(
                model,
                n,
                format_name,
                name,
                gguf_path=gguf_path,
                hf_dir=Path(merged["artifact_path"]),
                modelfile=spec,
            )
            result = generation.deploy(request)
        except (ChatTemplateError, GenerationError, LlamaCppToolError) as exc:
            raise dg.Failure(f"{adapter.key} n={n} {format_name}: {exc}") from exc
        context.log.info(f"{adapter.key} n={n} {format_name}: {result.backend} {result.status} - {result.detail}")
        rows.append(_deployment_row(adapter, n, format_name, result, modelfile))
    release_loaded_models()
    frame = pl.DataFrame(rows, schema=DEPLOYMENT_SCHEMA)
    return versioned_output(
        frame,
        backends=dg.MetadataValue.json({row["format"]: row["backend"] for row in rows}),
        statuses=dg.MetadataValue.json({row["format"]: row["status"] for row in rows}),
        modelfiles=dg.MetadataValue.json({row["format"]: row["modelfile_path"] for row in rows}),
    )


def build_answers_asset(format_name: str) -> dg.AssetsDefinition:
    @versioned()
    @dg.asset(
        name=f"answers_{format_name}",
        group_name=GROUP,
        kinds={"llama_cpp", "ollama", "duckdb"},
        partitions_def=stage3_partitions(),
        **GPU_STEP,
        ins={"deployment": dg.AssetIn(key="deployment"), "test_set": dg.AssetIn(key="test_set")},
        metadata=stage3_metadata("eval.answers", format_name),
        description=(
            f"The profile's evaluation questions (a seeded, category-stratified sample of the human-written "
            f"test questions) answered by the {format_name.upper()} deployment with the profile's deterministic "
            "generation settings; per answer the text, characters, tokens, seconds, backend and finish reason."
            + (
                " Only a model whose GGUF export failed has an nf4 deployment; every other partition writes no rows."
                if format_name == "nf4"
                else ""
            )
        ),
    )
    def answers_asset(
        context: dg.AssetExecutionContext,
        generation: GenerationBackend,
        deployment: pl.DataFrame,
        test_set: pl.DataFrame,
    ) -> dg.Output[pl.DataFrame]:
        adapter = partition_adapter(context)
        rows = deployment.filter(pl.col("format") == format_name)
        if format_name == "nf4" and rows.is_empty():
            context.log.info(f"{adapter.key}: its GGUF export succeeded, so it has no nf4 fallback to answer with")
            return versioned_output(pl.DataFrame(schema=ANSWER_SCHEMA), status="not applicable", questions=0)
        served = single_row(rows, f"deployment ({format_name})", adapter=adapter.key)
        n = int(served["n"])
        if served["status"] != "ok":
            context.log.warning(
                f"{adapter.key} n={n} {format_name} is not servable: {served['detail']}; no answers"
            )
            frame = pl.DataFrame(schema=ANSWER_SCHEMA)
            return versioned_output(frame, status="unavailable", reason=served["detail"], questions=0)
        profile = current_profile()
        try:
            questions = select_eval_questions(test_set, profile.eval_questions, seed=profile.generation.seed)
        except AnsweringInputError as exc:
            raise dg.Failure(str(exc)) from exc
        backend = serving_backend(generation, served)
        settings_used = profile.generation
        stops = tuple(model_entry(adapter.model).stop_tokens)
        progress = ProgressLogger(
            f"answers_{format_name} {adapter.key} n={n}", questions.height, context.log.info, unit="questions"
        )
        question_rows = list(questions.iter_rows(named=True))
        answers: list[dict[str, Any]] = []

        def on_answer(question: Mapping[str, Any], result: GenerationResult) -> None:
            progress.advance(
                detail=f"{question['question_id']}: {result.completion_tokens} tokens, {result.finish_reason}"
            )

        try:
            answered = answer_questions(
                backend, served["model_ref"], question_rows, settings_used, stops,
                concurrency=settings_used.concurrency, on_answer=on_answer,
            )  # fmt: skip
        except QuestionFailed as exc:
            raise dg.Failure(str(exc)) from exc
        finally:
            release_loaded_models()  # also stops a llama-server this step started
        for question, result in zip(question_rows, answered.results, strict=True):
            answers.append({
                **adapter_columns(adapter, n), "format": format_name, "question_id": str(question["question_id"]),
                "category": question["category"], "question": question["question"], "answer": result.text,
                "chars": len(result.text), "tokens": result.completion_tokens, "prompt_tokens": result.prompt_tokens,
                "seconds": round(result.seconds, 4), "backend": result.backend,
                "quantization": served["quantization"], "model_ref": served["model_ref"],
                "finish_reason": result.finish_reason, "seed": settings_used.seed,
                "temperature": settings_used.temperature, "max_new_tokens": settings_used.max_new_tokens,
            })  # fmt: skip
        summary = progress.finish()
        frame = pl.DataFrame(answers, schema=ANSWER_SCHEMA)
        truncated = int((frame["finish_reason"] == "length").sum())
        if truncated:
            context.log.warning(
                f"{truncated}/{frame.height} answers hit max_new_tokens={settings_used.max_new_tokens} "
                "(finish_reason='length'); raise generation.max_new_tokens if they matter"
            )
        total_seconds = float(frame["seconds"].sum())
        return versioned_output(
            frame,
            questions=frame.height,
            question_ids=dg.MetadataValue.json(frame["question_id"].to_list()),
            question_sample=f"stratified by category, seed {profile.generation.seed}",
            backend=str(served["backend"]),
            avg_chars=float(frame["chars"].cast(pl.Float64).mean() or 0.0),  # type: ignore[arg-type]
            sec_per_question=total_seconds / max(frame.height, 1),
            tokens_per_s=float(frame["tokens"].sum()) / total_seconds if total_seconds else 0.0,
            hit_max_tokens=truncated,
            concurrency=answered.concurrency,
            wall_seconds=round(answered.wall_seconds, 3),
            **summary.as_metadata("answering"),
        )

    return answers_asset


# One answers asset per format of the profile (formats: f16, q4_k_m and nf4 by default).
ANSWERS_ASSETS = {format_name: build_answers_asset(format_name) for format_name in current_profile().formats}


answers_f16 = ANSWERS_ASSETS.get("f16")


answers_q4_k_m = ANSWERS_ASSETS.get("q4_k_m")


answers_nf4 = ANSWERS_ASSETS.get("nf4")
