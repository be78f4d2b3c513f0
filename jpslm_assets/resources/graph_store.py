"""Where the knowledge graph lives: the seed shipped in the package, or a graph server over Bolt.

``GraphStore`` is the one interface the kg assets use (``read_graph``). Two implementations:

- ``SeedGraphStore`` (default): reads ``nodes.jsonl`` and ``relations.jsonl`` from the package, or from a
  folder given in its config.
- ``Neo4jGraphStore`` (``graph_store_neo4j``): the official ``neo4j`` driver over Bolt. Reads the graph
  with one query per node label and relation type, and ``publish`` mirrors a validated graph into the server
  with batched ``UNWIND ... MERGE`` statements, so publishing twice leaves the same graph. Only parameterized
  Cypher is sent; labels and relation types, which Cypher cannot take as parameters, are written into the
  text only after the vocabulary has vetted them as plain identifiers.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
from pydantic import Field

from jpslm_assets.kg.graph import KnowledgeGraph, Vocabulary, load_seed, load_vocabulary

T = TypeVar("T")

NODE_PROPERTIES = ("name", "name_en", "description", "volume", "chapter", "section", "category")
RELATION_PROPERTIES = ("description",)


class GraphStoreError(RuntimeError):
    """The graph server cannot be used; the message names the server and what to check."""


class GraphStoreTimeout(GraphStoreError):
    """A call to the graph server did not finish within its deadline."""


class GraphStore(dg.ConfigurableResource):
    """The interface the kg assets read from."""

    @abc.abstractmethod
    def read_graph(self, vocabulary: Vocabulary | None = None) -> KnowledgeGraph:
        """The whole graph, validated against the vocabulary (raises ``KnowledgeGraphError``)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the graph comes from, for metadata and error messages."""


class SeedGraphStore(GraphStore):
    """The seed graph shipped with the package (``jpslm_assets/data/kg``), or the same files in a folder."""

    folder: str | None = Field(
        default=None,
        description="Folder holding nodes.jsonl and relations.jsonl; empty means the seed in the package.",
    )

    def read_graph(self, vocabulary: Vocabulary | None = None) -> KnowledgeGraph:
        return load_seed(Path(self.folder) if self.folder else None, vocabulary or load_vocabulary())

    def describe(self) -> str:
        return f"seed folder {self.folder}" if self.folder else "the shipped seed (jpslm_assets/data/kg)"


PUBLISH_COUNTERS = (
    "nodes_created",
    "nodes_deleted",
    "relationships_created",
    "relationships_deleted",
    "properties_set",
)


@dataclass(frozen=True)
class PublishReport:
    """What a publish changed on the server, and what the server holds afterwards."""

    server: str
    kg_version: str
    nodes: int
    relations: int
    statements: int
    nodes_created: int
    nodes_deleted: int
    relationships_created: int
    relationships_deleted: int
    properties_set: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_with_deadline(work: Callable[[], T], seconds: float, what: str) -> T:
    """Run ``work`` in a daemon thread; raise ``GraphStoreTimeout`` if it has not finished after ``seconds``.

    The Bolt driver bounds connecting, but not waiting for a query's answer from a server that stopped
    responding; this puts a hard limit on the whole call. A thread left behind is a daemon, so it cannot
    keep the process alive.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=target, name=f"graph-store: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise GraphStoreTimeout(f"{what} did not finish within {seconds:g} s; the server is not answering")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
