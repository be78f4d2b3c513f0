"""A graph server over Bolt as the graph store (``Neo4jGraphStore``): reading the graph, publishing a
validated graph and checking what the server holds afterwards.

Works against Neo4j 5 and FalkorDB's Bolt endpoint (FalkorDB picks the graph from the ``database`` of an
explicit transaction, so every query runs inside a managed transaction). Neo4j runs a publish as one
transaction; FalkorDB applies statements one by one, so an interrupted publish can leave part of the
change behind, and publishing again completes it.

Values: Neo4j binds parameters as values. FalkorDB's Bolt endpoint writes them into the query text, where a
``'`` ends the string (and lets the rest run as Cypher), ``\\b`` becomes a backspace and NUL cuts the string
short. The store finds out which kind of server it talks to with one harmless probe (a parameter holding
two backslashes comes back as one when the server splices), and on a splicing server escapes ``\\`` and
``'`` in every string parameter, which FalkorDB's parser undoes exactly. A value such a server cannot carry
at all (NUL) is refused before anything is written, naming the record, the property and the character.
After a publish, the graph is read back and compared value by value with what was sent.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import dagster as dg
from pydantic import Field, PrivateAttr

from jpslm_assets.kg.graph import (
    IDENTIFIER,
    KnowledgeGraph,
    Located,
    Vocabulary,
    build_graph,
    graph_version,
    load_vocabulary,
)
from jpslm_assets.resources.graph_store import (
    NODE_PROPERTIES,
    PUBLISH_COUNTERS,
    RELATION_PROPERTIES,
    GraphStore,
    GraphStoreError,
    GraphStoreTimeout,
    PublishReport,
    run_with_deadline,
)

if TYPE_CHECKING:
    import neo4j

T = TypeVar("T")

BOLT_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")
# FalkorDB's Bolt endpoint reports a failed login (and any other server-side failure) with this code.
FALKORDB_GENERIC_ERROR = "Neo.DatabaseError.General.UnknownError"


# Probe for servers that splice parameters into the query text: two backslashes, no quote (harmless either way).
_SPLICE_PROBE = "jpslm\\\\probe"
# Characters a splicing server cannot carry in a string even when escaped (FalkorDB ends the string at NUL).
_UNCARRIABLE = {"\x00": "NUL"}


def escape_spliced(value: Any) -> Any:
    """``value`` with every string escaped for a server that splices parameters into single-quoted text."""
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("'", "\\'")
    if isinstance(value, dict):
        return {key: escape_spliced(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [escape_spliced(item) for item in value]
    return value


def uncarriable(record: str, fields: dict[str, Any]) -> str | None:
    """Why a splicing server cannot store ``fields`` of ``record`` unchanged, or None when it can."""
    for name, value in fields.items():
        if not isinstance(value, str):
            continue
        for position, character in enumerate(value):
            if character in _UNCARRIABLE:
                return (
                    f"{record} property {name} holds U+{ord(character):04X} ({_UNCARRIABLE[character]}) at "
                    f"character {position}, which this server cannot store (its Bolt endpoint cuts the string "
                    "there); remove the character from the graph's source"
                )
    return None


def _safe_identifier(name: str, vocabulary: Vocabulary) -> str:
    # Defence in depth: the vocabulary already enforces this, but nothing else guards the Cypher text.
    if not IDENTIFIER.match(name) or (
        name not in vocabulary.node_labels and name not in vocabulary.relation_types
    ):
        raise GraphStoreError(
            f"{name!r} is not a vocabulary label or relation type; refusing to put it in Cypher"
        )
    return name


class Neo4jGraphStore(GraphStore):
    """A Neo4j (or any Bolt) graph server, through the official ``neo4j`` driver."""

    uri: str = Field(description="Bolt URI, e.g. bolt://localhost:7687 or neo4j+s://host (NEO4J_URI)")
    user: str = Field(description="User name (NEO4J_USER)")
    password: str = Field(description="Password (NEO4J_PASSWORD)")
    database: str = Field(description="Database, or the graph name on FalkorDB (NEO4J_DATABASE)")
    connection_timeout_s: float = Field(default=5.0, gt=0, description="Connecting and the Bolt handshake")
    query_timeout_s: float = Field(default=60.0, gt=0, description="One read or publish, end to end")
    # Longer than the connection timeout, so one stalled connect (FalkorDB after a GOODBYE) is retried.
    max_retry_time_s: float = Field(default=15.0, ge=0, description="Retrying transient connection errors")
    batch_size: int = Field(default=500, gt=0, description="Most rows per UNWIND statement when publishing")
    # FalkorDB 4.16's Bolt endpoint crashes on request messages above about 3.5 KB, so the default keeps
    # each statement's rows within 2 KB; a Neo4j server takes far larger batches (raise it for big graphs).
    max_batch_bytes: int = Field(default=2048, gt=0, description="Most bytes of row data per statement")

    def describe(self) -> str:
        return f"graph server {self.uri} (database {self.database!r})"

    # ---------------------------------------------------------------------------------------- plumbing

    # One driver (and its connection pool) for the store's lifetime, as the driver is meant to be used:
    # Dagster closes it after the step (teardown_after_execution); direct callers call close().
    _driver_instance: Any = PrivateAttr(default=None)
    _driver_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _splices: bool | None = PrivateAttr(default=None)

    def _driver(self) -> neo4j.Driver:
        import neo4j

        scheme = self.uri.split("://", 1)[0].lower() if "://" in self.uri else ""
        if scheme not in BOLT_SCHEMES:
            raise GraphStoreError(
                f"NEO4J_URI {self.uri!r} is not a usable Bolt URI: the scheme must be one of "
                f"{', '.join(BOLT_SCHEMES)} (e.g. bolt://localhost:7687)"
            )
        with self._driver_lock:
            if self._driver_instance is None:
                try:
                    self._driver_instance = neo4j.GraphDatabase.driver(
                        self.uri,
                        auth=(self.user, self.password),
                        connection_timeout=self.connection_timeout_s,
                        connection_acquisition_timeout=self.connection_timeout_s,
                        max_transaction_retry_time=self.max_retry_time_s,
                    )
                except (ValueError, neo4j.exceptions.ConfigurationError) as exc:
                    raise GraphStoreError(f"NEO4J_URI {self.uri!r} is not a usable Bolt URI ({exc})") from exc
            return self._driver_instance

    def close(self) -> None:
        """Close the driver and its connections (a later call opens a new one)."""
        with self._driver_lock:
            driver, self._driver_instance = self._driver_instance, None
        if driver is not None:
            driver.close()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def _explain(self, exc: Exception) -> GraphStoreError:
        """Turn a driver error into one that names the server and the setting to check."""
        import neo4j.exceptions as errors

        where = self.describe()
        if isinstance(exc, errors.AuthError):
            return GraphStoreError(
                f"{where} refused user {self.user!r}: wrong user name or password ({exc.message}). "
                "Check NEO4J_USER and NEO4J_PASSWORD."
            )
        if isinstance(exc, errors.ServiceUnavailable):
            text = str(exc)
            # The driver's message is "Couldn't connect to ...:" followed by the underlying reason.
            reason = [line for line in text.splitlines() if line.strip()][-1]
            if "handshake" in text or "timed out" in text.lower() or "deadline" in text.lower():
                return GraphStoreError(
                    f"{where} accepted the connection but did not answer the Bolt handshake within "
                    f"{self.connection_timeout_s:g} s ({reason}). Is a Bolt server listening "
                    "on that port, and is it responsive? Check NEO4J_URI."
                )
            return GraphStoreError(f"{where} is not reachable ({reason}). Start the server or fix NEO4J_URI.")
        if isinstance(exc, errors.ClientError) and "DatabaseNotFound" in (exc.code or ""):
            return GraphStoreError(f"{where}: database {self.database!r} does not exist; fix NEO4J_DATABASE.")
        if isinstance(exc, errors.Neo4jError) and exc.code == FALKORDB_GENERIC_ERROR:
            return GraphStoreError(
                f"{where} rejected the request ({exc.code}: {exc.message}). A FalkorDB server answers a wrong "
                "password this way; check NEO4J_USER, NEO4J_PASSWORD and NEO4J_DATABASE."
            )
        if isinstance(exc, errors.Neo4jError):
            return GraphStoreError(f"{where} rejected the request ({exc.code}: {exc.message}).")
        return GraphStoreError(f"{where}: {type(exc).__name__}: {exc}")

    def _call(self, what: str, work: Callable[[neo4j.Session], T]) -> T:
        import neo4j

        def run() -> T:
            with self._driver().session(database=self.database) as session:
                try:
                    return work(session)
                except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as exc:
                    raise self._explain(exc) from exc

        deadline = self.connection_timeout_s + self.max_retry_time_s + self.query_timeout_s
        try:
            return run_with_deadline(run, deadline, f"{what} on {self.describe()}")
        except GraphStoreTimeout:
            # The stuck driver is abandoned, not closed: the hung call still holds its connection.
            with self._driver_lock:
                self._driver_instance = None
            raise
        except GraphStoreError:
            self.close()  # the next call starts with a fresh connection
            raise

    def splices_parameters(self) -> bool:
        """Whether the server writes parameters into the query text instead of binding them (FalkorDB)."""
        if self._splices is None:

            def probe(tx: neo4j.ManagedTransaction) -> Any:
                return tx.run("RETURN $probe AS probe", {"probe": _SPLICE_PROBE}).single(strict=True)["probe"]

            echoed = self._call(
                "probing parameter binding", lambda session: self._transaction(session, probe, False)
            )
            if echoed == _SPLICE_PROBE:
                self._splices = False
            elif echoed == _SPLICE_PROBE.replace("\\\\", "\\"):
                self._splices = True
            else:
                raise GraphStoreError(
                    f"{self.describe()} returned the parameter {_SPLICE_PROBE!r} as {echoed!r}; it neither binds "
                    "nor splices parameters in a known way, so values cannot be published safely."
                )
        return self._splices

    def _parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """Parameters as this server needs them so that values arrive unchanged."""
        return escape_spliced(parameters) if self.splices_parameters() else parameters

    def _transaction(
        self, session: neo4j.Session, work: Callable[[neo4j.ManagedTransaction], T], write: bool
    ) -> T:
        import neo4j

        # Managed transactions retry transient failures; FalkorDB selects the graph only inside one.
        unit = neo4j.unit_of_work(timeout=self.query_timeout_s)(work)
        return session.execute_write(unit) if write else session.execute_read(unit)

    # ------------------------------------------------------------------------------------------- reading

    def _read_records(self, vocabulary: Vocabulary) -> tuple[list[Located], list[Located]]:
        """Every node of a vocabulary label and relation of a vocabulary type, as raw records."""

        def read(tx: neo4j.ManagedTransaction) -> tuple[list[Located], list[Located]]:
            nodes: list[Located] = []
            for label in vocabulary.node_labels:
                label = _safe_identifier(label, vocabulary)
                fields = ", ".join(f"n.{name} AS {name}" for name in NODE_PROPERTIES)
                query = f"MATCH (n:{label}) RETURN n.node_id AS node_id, {fields}"
                for record in tx.run(query):
                    row = {"label": label, **record.data()}
                    # Unset optional properties come back as null; required ones are left for validation.
                    row = {key: value for key, value in row.items() if value is not None}
                    nodes.append(Located(f"graph node {row.get('node_id', '(no node_id)')} ({label})", row))
            relations: list[Located] = []
            for relation_type in vocabulary.relation_types:
                relation_type = _safe_identifier(relation_type, vocabulary)
                query = (
                    f"MATCH (a)-[r:{relation_type}]->(b) RETURN r.relation_id AS relation_id, "
                    "a.node_id AS source_id, b.node_id AS target_id, r.description AS description"
                )
                for record in tx.run(query):
                    row = {"relation_type": relation_type, **record.data()}
                    row = {key: value for key, value in row.items() if value is not None}
                    relations.append(
                        Located(f"graph relation {row.get('relation_id', '(no relation_id)')}", row)
                    )
            return nodes, relations

        return self._call("reading the graph", lambda session: self._transaction(session, read, False))

    def read_graph(self, vocabulary: Vocabulary | None = None) -> KnowledgeGraph:
        vocabulary = vocabulary or load_vocabulary()
        nodes, relations = self._read_records(vocabulary)
        return build_graph(nodes, relations, vocabulary, self.describe())

    def counts(self, vocabulary: Vocabulary | None = None) -> dict[str, int]:
        """Nodes per label and relations per type currently on the server (vocabulary entries only)."""
        vocabulary = vocabulary or load_vocabulary()

        def count(tx: neo4j.ManagedTransaction) -> dict[str, int]:
            found: dict[str, int] = {}
            for label in vocabulary.node_labels:
                query = f"MATCH (n:{_safe_identifier(label, vocabulary)}) RETURN count(n) AS c"
                found[label] = tx.run(query).single(strict=True)["c"]
            for relation_type in vocabulary.relation_types:
                query = f"MATCH ()-[r:{_safe_identifier(relation_type, vocabulary)}]->() RETURN count(r) AS c"
                found[relation_type] = tx.run(query).single(strict=True)["c"]
            return found

        return self._call("counting the graph", lambda session: self._transaction(session, count, False))

    # ------------------------------------------------------------------------------------------ publishing

    def publish(self, graph: KnowledgeGraph, vocabulary: Vocabulary | None = None) -> PublishReport:
        """Make the server's vocabulary part equal to ``graph``; publishing the same graph again changes nothing.

        Nodes are merged by (label, node_id) and relations by (type, relation_id, endpoints), each stamped
        with the graph's content hash in ``kg_version``. Afterwards, nodes of vocabulary labels and relations
        of vocabulary types that carry another stamp (left from an older graph) are deleted. Stamping instead
        of sending the full id lists keeps every message small (see ``max_batch_bytes``). Nodes with other
        labels and relations of other types are left alone.
        """
        vocabulary = vocabulary or load_vocabulary()
        version = graph_version(graph)
        expected_nodes, expected_relations = _expected_records(graph)
        if self.splices_parameters():
            for key, fields in [*expected_nodes.items(), *expected_relations.items()]:
                problem = uncarriable(_record_name(key), fields)
                if problem:
                    raise GraphStoreError(
                        f"not publishing to {self.describe()}: {problem}. Nothing was written."
                    )
        labels = graph.node_by_id()
        nodes_by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for node in graph.nodes:
            props = {name: getattr(node, name) for name in NODE_PROPERTIES}
            nodes_by_label[node.label].append({"node_id": node.node_id, "props": props})
        relations_by_shape: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        for relation in graph.relations:
            shape = (
                relation.relation_type,
                labels[relation.source_id].label,
                labels[relation.target_id].label,
            )
            relations_by_shape[shape].append(
                {
                    "relation_id": relation.relation_id,
                    "source_id": relation.source_id,
                    "target_id": relation.target_id,
                    "props": {name: getattr(relation, name) for name in RELATION_PROPERTIES},
                }
            )
        statements: list[tuple[str, dict[str, Any]]] = []
        for label, rows in nodes_by_label.items():
            safe = _safe_identifier(label, vocabulary)
            query = (
                f"UNWIND $rows AS row MERGE (n:{safe} {{node_id: row.node_id}}) "
                "SET n += row.props, n.kg_version = $version"
            )
            statements += [(query, {"rows": batch, "version": version}) for batch in self._batches(rows)]
        for label in vocabulary.node_labels:
            statements.append(
                (
                    f"MATCH (n:{_safe_identifier(label, vocabulary)}) "
                    "WHERE n.kg_version IS NULL OR n.kg_version <> $version DETACH DELETE n",
                    {"version": version},
                )
            )
        for (relation_type, source_label, target_label), rows in sorted(relations_by_shape.items()):
            query = (
                "UNWIND $rows AS row "
                f"MATCH (a:{_safe_identifier(source_label, vocabulary)} {{node_id: row.source_id}}) "
                f"MATCH (b:{_safe_identifier(target_label, vocabulary)} {{node_id: row.target_id}}) "
                f"MERGE (a)-[r:{_safe_identifier(relation_type, vocabulary)} "
                "{relation_id: row.relation_id}]->(b) SET r += row.props, r.kg_version = $version"
            )
            statements += [(query, {"rows": batch, "version": version}) for batch in self._batches(rows)]
        for relation_type in vocabulary.relation_types:
            # Also removes a relation whose endpoints changed: it was merged anew above, the old one is stale.
            statements.append(
                (
                    f"MATCH ()-[r:{_safe_identifier(relation_type, vocabulary)}]->() "
                    "WHERE r.kg_version IS NULL OR r.kg_version <> $version DELETE r",
                    {"version": version},
                )
            )
        totals: dict[str, int] = defaultdict(int)

        def write(tx: neo4j.ManagedTransaction) -> None:
            totals.clear()  # a retried transaction starts its tally afresh
            for query, parameters in statements:
                counters = tx.run(query, self._parameters(parameters)).consume().counters
                for name in PUBLISH_COUNTERS:
                    totals[name] += getattr(counters, name)

        self._call("publishing the graph", lambda session: self._transaction(session, write, True))
        nodes_back, relations_back = self._read_records(vocabulary)
        problems = _differences(expected_nodes, expected_relations, nodes_back, relations_back)
        if problems:
            raise GraphStoreError(
                f"after publishing, {self.describe()} does not hold the graph that was sent: "
                + "; ".join(problems)
                + ". Publish again; if the same values differ, the server changes them on the way in."
            )
        nodes_after, relations_after = len(nodes_back), len(relations_back)
        return PublishReport(
            server=self.describe(),
            kg_version=version,
            nodes=nodes_after,
            relations=relations_after,
            statements=len(statements),
            **{name: totals[name] for name in PUBLISH_COUNTERS},
        )

    def _batches(self, rows: Sequence[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Consecutive slices of ``rows`` within ``batch_size`` rows and ``max_batch_bytes`` of payload."""
        batch: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            row_bytes = len(json.dumps(row, ensure_ascii=False).encode("utf-8"))
            if batch and (len(batch) >= self.batch_size or size + row_bytes > self.max_batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(row)
            size += row_bytes
        if batch:
            yield batch


RecordKey = tuple[str, str]  # ("node", node_id) or ("relation", relation_id)


def _record_name(key: RecordKey) -> str:
    return f"{key[0]} {key[1]}"


def _expected_records(
    graph: KnowledgeGraph,
) -> tuple[dict[RecordKey, dict[str, Any]], dict[RecordKey, dict[str, Any]]]:
    """What the server must hold after a publish, keyed like ``_differences`` reads it back (nulls left out)."""
    nodes = {
        ("node", node.node_id): {
            name: value
            for name, value in {"label": node.label, **{p: getattr(node, p) for p in NODE_PROPERTIES}}.items()
            if value is not None
        }
        for node in graph.nodes
    }
    relations = {
        ("relation", relation.relation_id): {
            "relation_type": relation.relation_type,
            "source_id": relation.source_id,
            "target_id": relation.target_id,
            **{p: getattr(relation, p) for p in RELATION_PROPERTIES if getattr(relation, p) is not None},
        }
        for relation in graph.relations
    }
    return nodes, relations


def _differences(
    expected_nodes: dict[RecordKey, dict[str, Any]],
    expected_relations: dict[RecordKey, dict[str, Any]],
    nodes: list[Located],
    relations: list[Located],
    limit: int = 5,
) -> list[str]:
    """How the records read back differ from those sent: missing, unexpected, duplicated, changed values."""
    problems: list[str] = []
    for kind, expected, found, id_field in (
        ("node", expected_nodes, nodes, "node_id"),
        ("relation", expected_relations, relations, "relation_id"),
    ):
        seen: dict[RecordKey, dict[str, Any]] = {}
        for record in found:
            key = (kind, str(record.fields.get(id_field)))
            if key in seen:
                problems.append(f"{_record_name(key)} is on the server twice")
            seen[key] = {name: value for name, value in record.fields.items() if name != id_field}
        missing = sorted(set(expected) - set(seen))
        unexpected = sorted(set(seen) - set(expected))
        if missing:
            problems.append(
                f"{len(missing)} {kind}(s) missing ({', '.join(key[1] for key in missing[:limit])}"
                + (", ..." if len(missing) > limit else "")
                + "): another writer deleted them, or the server dropped writes"
            )
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected {kind}(s) ({', '.join(key[1] for key in unexpected[:limit])}"
                + (", ..." if len(unexpected) > limit else "")
                + "): another writer added them"
            )
        changed = 0
        for key in sorted(set(expected) & set(seen)):
            sent = {name: value for name, value in expected[key].items() if name != id_field}
            for name in sorted(set(sent) | set(seen[key])):
                if sent.get(name) != seen[key].get(name):
                    changed += 1
                    if changed <= limit:
                        problems.append(
                            f"{_record_name(key)} property {name}: sent {sent.get(name)!r}, "
                            f"the server holds {seen[key].get(name)!r}"
                        )
        if changed > limit:
            problems.append(f"{changed - limit} more changed {kind} value(s)")
    return problems


def neo4j_store_from_env() -> Neo4jGraphStore:
    """The Bolt store configured from NEO4J_URI, NEO4J_USER, NEO4J_PASSWORD and NEO4J_DATABASE at run time."""
    return Neo4jGraphStore(
        uri=dg.EnvVar("NEO4J_URI"),
        user=dg.EnvVar("NEO4J_USER"),
        password=dg.EnvVar("NEO4J_PASSWORD"),
        database=dg.EnvVar("NEO4J_DATABASE"),
    )
