"""The knowledge graph as the ``kg.nodes`` and ``kg.relations`` tables: the frames the kg assets store, the
checks their asset checks run on the stored tables, and the per-type counts and chart.

Plain functions only: no Dagster, no driver. Matplotlib is imported inside the chart function.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from jpslm_assets.kg.graph import KnowledgeGraph, Vocabulary

NODE_SCHEMA: dict[str, Any] = {
    "node_id": pl.String,
    "label": pl.String,
    "name": pl.String,
    "name_en": pl.String,
    "description": pl.String,
    "volume": pl.String,
    "chapter": pl.String,
    "section": pl.String,
    "category": pl.String,
    "location": pl.String,
}

RELATION_SCHEMA: dict[str, Any] = {
    "relation_id": pl.String,
    "source_id": pl.String,
    "relation_type": pl.String,
    "target_id": pl.String,
    "description": pl.String,
    "source_label": pl.String,
    "target_label": pl.String,
    "source_name": pl.String,
    "target_name": pl.String,
}


def location_of(volume: str | None, chapter: str | None, section: str | None) -> str:
    """The short citation of a place in the standards: 「設計編 第3章 第2節」 without the titles."""
    parts = [volume or ""]
    for title in (chapter, section):
        if title:
            parts.append(title.split()[0])
    return " ".join(part for part in parts if part)


def nodes_frame(graph: KnowledgeGraph) -> pl.DataFrame:
    """``kg.nodes``: one row per node, sorted by id, with the short ``location`` citation."""
    rows = [
        {**node.model_dump(), "location": location_of(node.volume, node.chapter, node.section)}
        for node in graph.nodes
    ]
    return pl.DataFrame(rows, schema=NODE_SCHEMA, orient="row")


def relations_frame(graph: KnowledgeGraph) -> pl.DataFrame:
    """``kg.relations``: one row per relation, sorted by id, with both endpoints' labels and names."""
    nodes = graph.node_by_id()
    rows = []
    for relation in graph.relations:
        source, target = nodes[relation.source_id], nodes[relation.target_id]
        rows.append(
            {
                **relation.model_dump(),
                "source_label": source.label,
                "target_label": target.label,
                "source_name": source.name,
                "target_name": target.name,
            }
        )
    return pl.DataFrame(rows, schema=RELATION_SCHEMA, orient="row")


def duplicate_ids(frame: pl.DataFrame, column: str) -> list[str]:
    """Problems for missing or repeated ids in ``column``."""
    problems = [f"{frame.filter(pl.col(column).is_null()).height} row(s) have no {column}"]
    problems = problems if frame[column].null_count() else []
    repeated = (
        frame.filter(pl.col(column).is_not_null())
        .group_by(column)
        .len()
        .filter(pl.col("len") > 1)
        .sort(column)
    )
    problems += [
        f"{column} {row[column]} appears {row['len']} times" for row in repeated.iter_rows(named=True)
    ]
    return problems


def values_outside(frame: pl.DataFrame, id_column: str, column: str, allowed: Iterable[str]) -> list[str]:
    """Problems for rows whose ``column`` is not one of ``allowed``."""
    allowed = list(allowed)
    bad = frame.filter(pl.col(column).is_null() | ~pl.col(column).is_in(allowed)).sort(id_column)
    return [
        f"{row[id_column]}: {column} {row[column]!r} is not in the vocabulary ({', '.join(allowed)})"
        for row in bad.iter_rows(named=True)
    ]


def empty_values(frame: pl.DataFrame, id_column: str, column: str) -> list[str]:
    bad = frame.filter(pl.col(column).is_null() | (pl.col(column).str.strip_chars() == "")).sort(id_column)
    return [f"{row[id_column]}: {column} is empty" for row in bad.iter_rows(named=True)]


def dangling_endpoints(relations: pl.DataFrame, nodes: pl.DataFrame) -> list[str]:
    """Problems for relations whose source or target is not a node id of ``nodes``."""
    known = nodes["node_id"].drop_nulls().unique()
    problems = []
    for end in ("source_id", "target_id"):
        missing = relations.filter(~pl.col(end).is_in(known) | pl.col(end).is_null()).sort("relation_id")
        problems += [
            f"relation {row['relation_id']} ({row['relation_type']}) points to missing node {row[end]}"
            for row in missing.iter_rows(named=True)
        ]
    return problems


def stored_nodes_differ(stored: pl.DataFrame, graph: KnowledgeGraph) -> str:
    """Empty when ``stored`` (``kg.nodes``) holds exactly the nodes of ``graph``, else what differs."""
    current = nodes_frame(graph)
    missing_columns = [column for column in current.columns if column not in stored.columns]
    if missing_columns:
        return f"kg.nodes lacks column(s) {', '.join(missing_columns)}"
    stored = stored.select(current.columns).sort("node_id")
    if stored.equals(current):
        return ""
    stored_ids, current_ids = set(stored["node_id"].to_list()), set(current["node_id"].to_list())
    if stored_ids != current_ids:
        only_graph = sorted(current_ids - stored_ids)[:5]
        only_table = sorted(stored_ids - current_ids)[:5]
        return f"node ids only in the graph: {only_graph or 'none'}; only in kg.nodes: {only_table or 'none'}"
    changed = stored.join(current, on="node_id", suffix="_now").filter(
        pl.any_horizontal(
            pl.col(column).ne_missing(pl.col(f"{column}_now"))
            for column in current.columns
            if column != "node_id"
        )
    )
    return f"{changed.height} node(s) changed, e.g. {', '.join(changed['node_id'].head(5).to_list())}"


def relation_type_counts(graph: KnowledgeGraph, vocabulary: Vocabulary) -> dict[str, int]:
    """Relations per type in vocabulary order (types without relations count 0)."""
    counts = Counter(relation.relation_type for relation in graph.relations)
    return {relation_type: counts.get(relation_type, 0) for relation_type in vocabulary.relation_types}


def node_label_counts(graph: KnowledgeGraph, vocabulary: Vocabulary) -> dict[str, int]:
    counts = Counter(node.label for node in graph.nodes)
    return {label: counts.get(label, 0) for label in vocabulary.node_labels}


def relation_type_chart(counts: Mapping[str, int], title: str, font_file: Path | None = None) -> bytes:
    """A horizontal bar chart (PNG bytes) of relations per type with Japanese labels."""
    from matplotlib import font_manager
    from matplotlib.figure import Figure

    # The font is loaded from its file, so the chart renders the same on machines without Japanese fonts.
    from jpslm_assets.common.figures import japanese_font_path

    font = font_manager.FontProperties(fname=str(font_file or japanese_font_path()))
    total = sum(counts.values()) or 1
    names = list(counts)[::-1]
    values = [counts[name] for name in names]
    figure = Figure(figsize=(7.0, 0.38 * len(names) + 1.2), dpi=100)
    axes = figure.subplots()
    bars = axes.barh(names, values, color="#3b6ea8")
    for bar, value in zip(bars, values, strict=True):
        axes.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {value} ({value / total:.1%})",
            va="center",
            fontproperties=font,
            fontsize=9,
        )
    axes.set_title(title, fontproperties=font)
    axes.set_xlabel("関係の数", fontproperties=font)
    axes.set_xlim(0, max([*values, 1]) * 1.25)
    for label in axes.get_yticklabels():
        label.set_fontproperties(font)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
