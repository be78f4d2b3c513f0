"""Template expansion over the knowledge graph, and duplicate removal: the QA pool.

Every relation of the graph is expanded with every template of its relation type; each pair records the
relation, the template (id, version, direction), the category it belongs to, the nodes it rests on and
the standards locations its answer cites. Expansion is deterministic (sorted by relation and template), so
the pool's content hash changes only when the graph or the templates change.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from jpslm_assets.qa.templates import NODE_FIELDS, TemplateCatalogue, TemplateError

NODE_COLUMNS = ("node_id", "label", "name", "description", "volume", "chapter", "section", "category")
RELATION_COLUMNS = ("relation_id", "source_id", "relation_type", "target_id")
SENTENCE_STOPS = "。．.！？!?」）)"

POOL_SCHEMA: dict[str, Any] = {
    "qa_id": pl.String,
    "relation_id": pl.String,
    "relation_type": pl.String,
    "template_id": pl.String,
    "template_version": pl.String,
    "direction": pl.String,
    "question": pl.String,
    "answer": pl.String,
    "category": pl.String,
    "source_id": pl.String,
    "target_id": pl.String,
    "node_ids": pl.List(pl.String),
    "citation": pl.String,
    "question_chars": pl.Int64,
    "answer_chars": pl.Int64,
    "rephrased": pl.Boolean,
    "original_question": pl.String,
}


class GraphInputError(ValueError):
    """The graph tables cannot be turned into QA pairs; the message names the row and the fix."""


def citation_of(volume: str | None, chapter: str | None, section: str | None) -> str:
    """The standards location of a node as cited in answers: 「<volume> <chapter> <section>」."""
    parts = [part.strip() for part in (volume, chapter, section) if part and part.strip()]
    return f"「{' '.join(parts)}」" if parts else ""


def as_sentence(text: str) -> str:
    """The text with a closing sentence stop, so answer frames can place it as a standalone sentence."""
    text = text.strip()
    return text if not text or text[-1] in SENTENCE_STOPS else text + "。"


def cites_a_location(answer: str, citation: str) -> bool:
    """Whether an answer quotes at least one of the standards locations (「...」) listed in ``citation``."""
    return any(f"「{location}」" in answer for location in re.findall(r"「([^「」]+)」", citation))


def normalize_text(text: str) -> str:
    """NFKC, lower-cased, whitespace removed: the form duplicates and overlaps are judged on."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())


def normalized(column: str) -> pl.Expr:
    """``normalize_text`` as a polars expression (vectorized; used on whole columns)."""
    return pl.col(column).str.normalize("NFKC").str.to_lowercase().str.replace_all(r"\s+", "")


def _require_columns(frame: pl.DataFrame, columns: Sequence[str], table: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise GraphInputError(
            f"{table} lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}. "
            f"Re-materialize the kg assets with the current schema (docs/architecture.md)."
        )


def _node_contexts(nodes: pl.DataFrame, catalogue: TemplateCatalogue) -> dict[str, dict[str, str]]:
    """Per node id, the placeholder values a template can use (missing values become empty strings)."""
    _require_columns(nodes, NODE_COLUMNS, "kg.nodes")
    known_categories = set(catalogue.categories)
    contexts: dict[str, dict[str, str]] = {}
    for row in nodes.iter_rows(named=True):
        node_id = str(row["node_id"])
        if node_id in contexts:
            raise GraphInputError(f"kg.nodes has node {node_id} twice; node ids must be unique.")
        category = row.get("category")
        if category and category not in known_categories:
            raise GraphInputError(
                f"node {node_id} ({row.get('name')}) has category {category!r}, which is not one of "
                f"{', '.join(catalogue.categories)}; fix the node or the categories list in qa_templates.yaml."
            )
        if not (row.get("name") or "").strip():
            raise GraphInputError(
                f"node {node_id} has an empty name; every node needs a name for its questions."
            )
        values = {name: "" if row.get(name) is None else str(row.get(name)) for name in NODE_FIELDS}
        values["label_word"] = catalogue.label_words.get(values["label"], values["label"])
        values["description"] = as_sentence(values["description"])
        values["citation"] = citation_of(row.get("volume"), row.get("chapter"), row.get("section"))
        contexts[node_id] = values
    return contexts


@dataclass
class ExpansionReport:
    """What expansion did, for metadata: pairs per relation type and template counts."""

    relations: int = 0
    pairs: int = 0
    pairs_by_type: dict[str, int] = field(default_factory=dict)
    templates_by_type: dict[str, int] = field(default_factory=dict)


def expand_templates(
    nodes: pl.DataFrame, relations: pl.DataFrame, catalogue: TemplateCatalogue
) -> tuple[pl.DataFrame, ExpansionReport]:
    """Every relation x every template of its type, as a frame with ``POOL_SCHEMA`` (before dedup)."""
    if nodes.height == 0 or relations.height == 0:
        raise GraphInputError(
            f"the knowledge graph is empty (kg.nodes: {nodes.height} rows, kg.relations: {relations.height} "
            "rows); materialize kg_nodes and kg_relations from a populated graph (the shipped seed or Neo4j) "
            "before building the QA pool."
        )
    _require_columns(relations, RELATION_COLUMNS, "kg.relations")
    contexts = _node_contexts(nodes, catalogue)

    relations = relations.sort("relation_id")
    untemplated = sorted(set(relations["relation_type"].to_list()) - set(catalogue.relation_types))
    if untemplated:
        examples = {
            relation_type: relations.filter(pl.col("relation_type") == relation_type)["relation_id"]
            .head(3)
            .to_list()
            for relation_type in untemplated
        }
        listing = "; ".join(
            f"{key} (e.g. relations {', '.join(map(str, ids))})" for key, ids in examples.items()
        )
        raise TemplateError(
            f"relation type(s) without templates: {listing}. Add them under relation_types in "
            "qa_templates.yaml, or remove those relations from the graph."
        )

    # Pre-resolve each type's templates once: (template, answer frame) pairs in file order.
    resolved = {
        relation_type: [
            (template, catalogue.answer_frame(relation_type, template)) for template in block.templates
        ]
        for relation_type, block in catalogue.relation_types.items()
    }
    columns: dict[str, list[Any]] = {name: [] for name in POOL_SCHEMA}
    report = ExpansionReport(relations=relations.height, templates_by_type=dict(catalogue.template_count))
    prefixes = ("source_", "target_")
    for relation in relations.iter_rows(named=True):
        relation_id = str(relation["relation_id"])
        relation_type = relation["relation_type"]
        ends = []
        for end in ("source_id", "target_id"):
            node_id = str(relation[end])
            if node_id not in contexts:
                raise GraphInputError(
                    f"relation {relation_id} ({relation_type}) points to missing node {node_id} as its "
                    f"{end.removesuffix('_id')}; add the node to kg.nodes or drop the relation."
                )
            ends.append(contexts[node_id])
        values: dict[str, str] = {"relation_type": relation_type}
        values["relation_description"] = str(relation.get("description") or "")
        for prefix, context in zip(prefixes, ends, strict=True):
            for name, value in context.items():
                values[prefix + name] = value
        block = catalogue.relation_types[relation_type]
        primary, fallback = (ends[0], ends[1]) if block.category_from == "source" else (ends[1], ends[0])
        category = primary["category"] or fallback["category"]
        if not category:
            raise GraphInputError(
                f"relation {relation_id} ({relation_type}): neither node has a category; give node "
                f"{relation['source_id']} or {relation['target_id']} one of {', '.join(catalogue.categories)}."
            )
        citations = list(dict.fromkeys(c for c in (ends[0]["citation"], ends[1]["citation"]) if c))
        citation = "".join(citations)
        values["citations"] = "、".join(citations)
        source_id, target_id = str(relation["source_id"]), str(relation["target_id"])
        for template, answer_frame in resolved[relation_type]:
            question = template.question.format_map(values).strip()
            answer = answer_frame.format_map(values).strip()
            template_id = f"{relation_type}.{template.id}"
            columns["qa_id"].append(f"{relation_id}:{template_id}")
            columns["relation_id"].append(relation_id)
            columns["relation_type"].append(relation_type)
            columns["template_id"].append(template_id)
            columns["template_version"].append(template.version)
            columns["direction"].append(template.direction)
            columns["question"].append(question)
            columns["answer"].append(answer)
            columns["category"].append(category)
            columns["source_id"].append(source_id)
            columns["target_id"].append(target_id)
            columns["node_ids"].append([source_id, target_id])
            columns["citation"].append(citation)
            columns["question_chars"].append(len(question))
            columns["answer_chars"].append(len(answer))
            columns["rephrased"].append(False)
            columns["original_question"].append(None)
        report.pairs_by_type[relation_type] = report.pairs_by_type.get(relation_type, 0) + len(
            resolved[relation_type]
        )
    frame = pl.DataFrame(columns, schema=POOL_SCHEMA)
    report.pairs = frame.height
    return frame, report


@dataclass
class DedupReport:
    """How many pairs each rule removed, with a few examples of near duplicates for the metadata."""

    input_pairs: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def output_pairs(self) -> int:
        return self.input_pairs - self.exact_removed - self.near_removed


def _shingles(text: str, width: int) -> list[bytes]:
    if len(text) <= width:
        return [text.encode("utf-8")]
    return [text[i : i + width].encode("utf-8") for i in range(len(text) - width + 1)]


def _clauses(text: str) -> list[bytes]:
    parts = [part for part in re.split(r"[、。]", text) if part]
    return [part.encode("utf-8") for part in parts] or [text.encode("utf-8")]


def deduplicate(frame: pl.DataFrame, catalogue: TemplateCatalogue) -> tuple[pl.DataFrame, DedupReport]:
    """Drop exact and near-duplicate pairs, keeping the first in (relation_id, template) order.

    - exact: the same question after ``normalize_text`` — a question must have one answer in training data.
    - near: MinHash LSH (datasketch) proposes candidates similar in their question (character shingles)
      and in their answer (clauses); a candidate is a duplicate when rapidfuzz's normalized Indel
      similarity of both the questions and the answers reaches ``dedup.confirm_ratio``. Requiring both keeps distinct facts that
      happen to be phrased alike (chapter 1 vs chapter 2) and removes cosmetic rewordings of one fact.
    """
    from datasketch import MinHash, MinHashLSH
    from rapidfuzz import fuzz, process

    settings = catalogue.dedup
    report = DedupReport(input_pairs=frame.height)
    if frame.height == 0:
        return frame, report
    ordered = frame.sort(["relation_id", "template_id"]).with_columns(
        normalized("question").alias("_question_key")
    )
    first = ordered.unique(subset="_question_key", keep="first", maintain_order=True)
    report.exact_removed = ordered.height - first.height

    questions = first["_question_key"].to_list()
    answers = first.select(normalized("answer"))["answer"].to_list()
    qa_ids = first["qa_id"].to_list()
    # Two indexes, because a near duplicate must be close in both: questions by character shingles, answers
    # by their clauses (split at 、 and 。; an answer repeats the node descriptions, so clauses tell apart
    # answers about different nodes cheaply). Only pairs proposed by both are scored.
    # CRC-32 as the shingle hash: the library's default (SHA-1 per shingle) costs twice as much, and the
    # MinHash permutations applied on top make either good enough for proposing candidates.
    question_hashes = MinHash.bulk(
        [_shingles(q, settings.shingle_chars) for q in questions],
        num_perm=settings.num_perm,
        hashfunc=zlib.crc32,
    )
    answer_hashes = MinHash.bulk(
        [_clauses(a) for a in answers], num_perm=settings.num_perm, hashfunc=zlib.crc32
    )
    question_index = MinHashLSH(threshold=settings.lsh_threshold, num_perm=settings.num_perm)
    answer_index = MinHashLSH(threshold=settings.answer_lsh_threshold, num_perm=settings.num_perm)
    keep = [True] * len(questions)
    threshold = settings.confirm_ratio
    for index, (question_hash, answer_hash) in enumerate(zip(question_hashes, answer_hashes, strict=True)):
        duplicate_of = None
        proposed = question_index.query(question_hash)
        if proposed:
            proposed = set(proposed) & set(answer_index.query(answer_hash))
        candidates = sorted(proposed)  # earliest kept pair first: deterministic examples
        if candidates:
            # Score all candidates in one rapidfuzz call (C++), questions first, answers only for close ones.
            question_scores = process.cdist(
                [questions[index]],
                [questions[c] for c in candidates],
                scorer=fuzz.ratio,
                score_cutoff=threshold,
            )[0]
            close = [c for c, score in zip(candidates, question_scores, strict=True) if score >= threshold]
            if close:
                answer_scores = process.cdist(
                    [answers[index]], [answers[c] for c in close], scorer=fuzz.ratio, score_cutoff=threshold
                )[0]
                duplicate_of = next(
                    (c for c, score in zip(close, answer_scores, strict=True) if score >= threshold), None
                )
        if duplicate_of is None:
            question_index.insert(index, question_hash)
            answer_index.insert(index, answer_hash)
        else:
            keep[index] = False
            if len(report.examples) < 5:
                report.examples.append(
                    {
                        "kept": qa_ids[duplicate_of],
                        "dropped": qa_ids[index],
                        "question_ratio": round(fuzz.ratio(questions[index], questions[duplicate_of]), 1),
                    }
                )
    report.near_removed = keep.count(False)
    result = first.filter(pl.Series(keep)).drop("_question_key")
    return result.sort("qa_id"), report


def relation_shares(frame: pl.DataFrame, reference_counts: Mapping[str, int] | None = None) -> pl.DataFrame:
    """Count and share per relation type; with ``reference_counts``, the paper's count and share beside them."""
    total = frame.height or 1
    shares = (
        frame.group_by("relation_type")
        .len("count")
        .with_columns(pl.col("count").cast(pl.Int64), (pl.col("count") / total).alias("share"))
    )
    if reference_counts is not None:
        reference_total = sum(reference_counts.values()) or 1
        paper_frame = pl.DataFrame(
            {
                "relation_type": list(reference_counts),
                "paper_count": [int(v) for v in reference_counts.values()],
                "paper_share": [v / reference_total for v in reference_counts.values()],
            },
            schema={"relation_type": pl.String, "paper_count": pl.Int64, "paper_share": pl.Float64},
        )
        shares = shares.join(paper_frame, on="relation_type", how="full", coalesce=True).with_columns(
            pl.col("count").fill_null(0), pl.col("share").fill_null(0.0)
        )
        shares = shares.with_columns(((pl.col("share") - pl.col("paper_share")) * 100).alias("delta_pp"))
    return shares.sort(["count", "relation_type"], descending=[True, False])
