"""The knowledge-graph stage: the standards graph read from the configured store into DuckDB.

Assets (tables in DuckDB schema ``kg``):
- ``kg_nodes`` (``kg.nodes``): volumes, chapters, sections, items and concepts, each with its place in the
  standards (``volume``, ``chapter``, ``section`` and the short citation ``location``).
- ``kg_relations`` (``kg.relations``): typed relations between them, with both endpoints' labels and names.

Both read the whole graph from the ``graph_store`` resource (the shipped seed, or a Neo4j server when the
profile says ``graph_store: neo4j``) and validate it against ``data/kg/vocabulary.yaml`` before anything is
written, so bad input leaves the stored tables as they were. Data versions are content hashes: downstream
work re-runs only when the graph changes. Blocking checks re-verify the stored tables (ids unique, labels,
types and categories from the vocabulary, every relation endpoint present in ``kg.nodes``).

Job ``kg_publish`` writes the seed into the graph server named by NEO4J_URI / NEO4J_USER / NEO4J_PASSWORD /
NEO4J_DATABASE; publishing twice leaves the same graph.
"""

import base64
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.code_versions import versioned
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.kg import graph as kg
from jpslm_assets.kg import tables as graph_tables
from jpslm_assets.metadata import counts_table
from jpslm_assets.outputs import versioned_output
from jpslm_assets.resources.graph_store import GraphStore, SeedGraphStore
from jpslm_assets.resources.graph_store_neo4j import Neo4jGraphStore, neo4j_store_from_env

GROUP = "kg"
TABLE_KINDS = {"duckdb", "polars"}


# ------------------------------------------------------------------------------------------------ helpers


def _read_graph(context: dg.AssetExecutionContext, graph_store: GraphStore) -> kg.KnowledgeGraph:
    vocabulary = kg.load_vocabulary()
    context.log.info(f"reading the knowledge graph from {graph_store.describe()}")
    return graph_store.read_graph(vocabulary)


# ------------------------------------------------------------------------------------------------- assets


@versioned()
@dg.asset(
    group_name=GROUP,
    kinds=TABLE_KINDS,
    metadata=table_metadata("kg.nodes"),
)
def kg_nodes(context: dg.AssetExecutionContext, graph_store: GraphStore) -> dg.Output[pl.DataFrame]:
    """Nodes of the standards knowledge graph, one row each, with their place in the standards.

    Read from the configured graph store and validated (ids unique, labels and categories from the
    vocabulary, every place naming existing volume / chapter / section nodes) before it is stored.
    """
    graph = _read_graph(context, graph_store)
    vocabulary = kg.load_vocabulary()
    frame = graph_tables.nodes_frame(graph)
    by_label = graph_tables.node_label_counts(graph, vocabulary)
    by_category = {
        category: frame.filter(pl.col("category") == category).height for category in vocabulary.categories
    }
    return versioned_output(
        frame,
        **{
            "graph_source": graph_store.describe(),
            "kg_version": kg.graph_version(graph),
            "nodes_by_label": counts_table(by_label, "label"),
            "nodes_by_category": counts_table(by_category, "category"),
        },
    )


@versioned()
@dg.asset(
    group_name=GROUP,
    kinds=TABLE_KINDS,
    metadata=table_metadata("kg.relations"),
)
def kg_relations(
    context: dg.AssetExecutionContext, kg_nodes: pl.DataFrame, graph_store: GraphStore
) -> dg.Output[pl.DataFrame]:
    """Typed relations of the standards knowledge graph (11 types), with endpoint labels and names.

    Read from the configured graph store and validated (ids unique, types from the vocabulary, both
    endpoints present and of the labels the type allows). Refuses to write when ``kg.nodes`` holds a
    different graph than the store now does, so the two tables never disagree; metadata shows the
    relation-type distribution as a table and a chart.
    """
    graph = _read_graph(context, graph_store)
    vocabulary = kg.load_vocabulary()
    stale = graph_tables.stored_nodes_differ(kg_nodes, graph)
    if stale:
        raise kg.KnowledgeGraphError(
            graph_store.describe(),
            [
                f"kg.nodes holds a different graph than {graph_store.describe()} ({stale}); materialize "
                "kg_nodes and kg_relations together"
            ],
        )
    frame = graph_tables.relations_frame(graph)
    by_type = graph_tables.relation_type_counts(graph, vocabulary)
    chart = graph_tables.relation_type_chart(by_type, f"関係タイプの分布（{len(graph.relations)}件）")
    encoded = base64.b64encode(chart).decode("ascii")
    return versioned_output(
        frame,
        **{
            "graph_source": graph_store.describe(),
            "kg_version": kg.graph_version(graph),
            "relation_types": len([count for count in by_type.values() if count]),
            "relations_by_type": counts_table(by_type, "relation type"),
            "relation_type_chart": dg.MetadataValue.md(f"![relation types](data:image/png;base64,{encoded})"),
        },
    )


# ------------------------------------------------------------------------------------------------- checks


def _check_result(problems: list[str], **metadata: Any) -> dg.AssetCheckResult:
    shown = problems[: kg.MAX_LISTED_PROBLEMS]
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "problems": len(problems),
            "examples": dg.MetadataValue.md("\n".join(f"- {problem}" for problem in shown) or "none"),
            **metadata,
        },
    )


@dg.asset_check(asset=kg_nodes, blocking=True, description="node_id present and unique in kg.nodes")
def kg_node_ids_unique(kg_nodes: pl.DataFrame) -> dg.AssetCheckResult:
    return _check_result(graph_tables.duplicate_ids(kg_nodes, "node_id"), nodes=kg_nodes.height)


@dg.asset_check(
    asset=kg_nodes,
    blocking=True,
    description="Every node's label and category is in the vocabulary and its name is not empty",
)
def kg_node_labels_in_vocabulary(kg_nodes: pl.DataFrame) -> dg.AssetCheckResult:
    vocabulary = kg.load_vocabulary()
    problems = graph_tables.values_outside(kg_nodes, "node_id", "label", vocabulary.node_labels)
    problems += graph_tables.values_outside(kg_nodes, "node_id", "category", vocabulary.categories)
    problems += graph_tables.empty_values(kg_nodes, "node_id", "name")
    return _check_result(problems, labels=kg_nodes["label"].n_unique())


@dg.asset_check(asset=kg_relations, blocking=True, description="relation_id present and unique")
def kg_relation_ids_unique(kg_relations: pl.DataFrame) -> dg.AssetCheckResult:
    return _check_result(graph_tables.duplicate_ids(kg_relations, "relation_id"), relations=kg_relations.height)


@dg.asset_check(
    asset=kg_relations, blocking=True, description="Every relation type is one of the vocabulary's"
)
def kg_relation_types_in_vocabulary(kg_relations: pl.DataFrame) -> dg.AssetCheckResult:
    vocabulary = kg.load_vocabulary()
    problems = graph_tables.values_outside(
        kg_relations, "relation_id", "relation_type", vocabulary.relation_types
    )
    return _check_result(problems, relation_types=kg_relations["relation_type"].n_unique())


@dg.asset_check(
    asset=kg_relations,
    blocking=True,
    additional_ins={"kg_nodes": dg.AssetIn("kg_nodes")},
    description="Both endpoints of every relation are rows of kg.nodes",
)
def kg_relation_endpoints_exist(kg_relations: pl.DataFrame, kg_nodes: pl.DataFrame) -> dg.AssetCheckResult:
    return _check_result(graph_tables.dangling_endpoints(kg_relations, kg_nodes), relations=kg_relations.height)


# ---------------------------------------------------------------------------------------------- publish


@dg.op(
    out=dg.Out(dg.Nothing),
    description="Validate the seed graph and mirror it into the graph server (idempotent).",
)
def publish_seed_to_graph_server(
    context: dg.OpExecutionContext, kg_seed: SeedGraphStore, graph_server: Neo4jGraphStore
) -> None:
    vocabulary = kg.load_vocabulary()
    graph = kg_seed.read_graph(vocabulary)
    context.log.info(
        f"publishing {len(graph.nodes)} nodes and {len(graph.relations)} relations from "
        f"{kg_seed.describe()} to {graph_server.describe()}"
    )
    report = graph_server.publish(graph, vocabulary)
    context.log.info(f"published: {report}")
    context.add_output_metadata(report.as_dict())


@dg.job(
    name="kg_publish",
    description="Write the seed knowledge graph into the Bolt graph server (NEO4J_* variables); "
    "running it again leaves the same graph.",
    tags={"stage": "kg"},
)
def kg_publish() -> None:
    publish_seed_to_graph_server()


# ------------------------------------------------------------------------------------------ definitions


def graph_store_for(profile: settings.Profile) -> GraphStore:
    """The store the kg assets read: the seed (shipped, or the profile's ``kg_seed_folder``), or the Neo4j
    server from NEO4J_* variables."""
    if profile.graph_store == "neo4j":
        return neo4j_store_from_env()
    return seed_store_for(profile)


def seed_store_for(profile: settings.Profile) -> SeedGraphStore:
    folder = profile.kg_seed_folder
    return SeedGraphStore(folder=str(Path(folder).expanduser().resolve())) if folder else SeedGraphStore()


defs = dg.Definitions(
    assets=[kg_nodes, kg_relations],
    asset_checks=[
        kg_node_ids_unique,
        kg_node_labels_in_vocabulary,
        kg_relation_ids_unique,
        kg_relation_types_in_vocabulary,
        kg_relation_endpoints_exist,
    ],
    jobs=[kg_publish],
    resources={
        "graph_store": graph_store_for(settings.current_profile()),
        "kg_seed": seed_store_for(settings.current_profile()),
        "graph_server": neo4j_store_from_env(),
    },
)
