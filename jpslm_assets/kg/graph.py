"""The knowledge graph of the River and Sediment Control Technical Standards: records, vocabulary, checks.

A graph is a list of nodes (volumes, chapters, sections, items, concepts) and typed relations between them.
It arrives from the shipped seed (two JSONL files) or from a graph server; either way it is validated here
against ``data/kg/vocabulary.yaml`` before anything is stored, and every problem names the record it comes
from (file and line, or graph node id) and what to change.

Plain functions only: no Dagster, no driver. The tables the kg assets store from a graph, and the checks on
stored tables, are in ``knowledge_graph_tables``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

NODES_FILE = "nodes.jsonl"
RELATIONS_FILE = "relations.jsonl"
VOCABULARY_FILE = "vocabulary.yaml"
# How many problems an error message lists before summarizing the rest.
MAX_LISTED_PROBLEMS = 20
# Labels and relation types end up inside Cypher text (they cannot be parameters), so only plain words pass.
IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class KnowledgeGraphError(ValueError):
    """The graph (or its vocabulary) is unusable; ``problems`` lists each bad record and its fix."""

    def __init__(self, origin: str, problems: Sequence[str]) -> None:
        self.origin = origin
        self.problems = list(problems)
        listed = self.problems[:MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(listed)
        text = f"knowledge graph from {origin} has {len(self.problems)} problem(s):\n" + "\n".join(
            f"- {problem}" for problem in listed
        )
        if more:
            text += f"\n- ... and {more} more"
        super().__init__(text)


# ---------------------------------------------------------------------------------------------- vocabulary


class RelationRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str
    source: tuple[str, ...]
    target: tuple[str, ...]


class Vocabulary(BaseModel):
    """Node labels, relation types (with the labels they may connect) and the eight categories."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_labels: dict[str, str]
    relation_types: dict[str, RelationRule]
    categories: tuple[str, ...]

    @field_validator("node_labels", "relation_types")
    @classmethod
    def _identifiers(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [key for key in value if not IDENTIFIER.match(key)]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))} must be plain words (letters, digits, underscore, starting with a "
                "letter) because they are written into Cypher queries"
            )
        if not value:
            raise ValueError("must not be empty")
        return value

    def model_post_init(self, __context: Any) -> None:
        for name, rule in self.relation_types.items():
            unknown = sorted(set(rule.source + rule.target) - set(self.node_labels))
            if unknown:
                raise ValueError(
                    f"relation type {name} connects label(s) {', '.join(unknown)} that are not in node_labels"
                )


def load_vocabulary(path: Path | None = None) -> Vocabulary:
    """The vocabulary shipped with the package, or the YAML file at ``path``."""
    if path is None:
        traversable = resources.files("jpslm_assets") / "data" / "kg" / VOCABULARY_FILE
        origin, text = f"jpslm_assets/data/kg/{VOCABULARY_FILE}", traversable.read_text("utf-8")
    else:
        origin, text = str(path), Path(path).read_text("utf-8")
    try:
        raw = yaml.safe_load(text)
        return Vocabulary.model_validate(raw)
    except (yaml.YAMLError, ValidationError, ValueError) as exc:
        raise KnowledgeGraphError(origin, [f"the vocabulary file is invalid: {exc}"]) from exc


# -------------------------------------------------------------------------------------------------- records


def _not_blank(value: str, field: str) -> str:
    if not value.strip():
        raise ValueError(f"{field} is empty")
    return value.strip()


class NodeRecord(BaseModel):
    """One node as written in ``nodes.jsonl`` (or read from the graph server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str
    label: str
    name: str
    name_en: str | None = None
    description: str
    volume: str
    chapter: str | None = None
    section: str | None = None
    category: str

    @field_validator("node_id", "label", "name", "description", "volume", "category")
    @classmethod
    def _required_text(cls, value: str, info: Any) -> str:
        return _not_blank(value, info.field_name)

    @field_validator("chapter", "section", "name_en")
    @classmethod
    def _optional_text(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None  # "" means "not given", as null does


class RelationRecord(BaseModel):
    """One relation as written in ``relations.jsonl`` (or read from the graph server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relation_id: str
    source_id: str
    relation_type: str
    target_id: str
    description: str

    @field_validator("relation_id", "source_id", "relation_type", "target_id", "description")
    @classmethod
    def _required_text(cls, value: str, info: ValidationInfo) -> str:
        return _not_blank(value, str(info.field_name))


RecordT = TypeVar("RecordT", NodeRecord, RelationRecord)


@dataclass(frozen=True)
class Located:
    """A raw record and where it came from ("nodes.jsonl line 12", "graph node N-012")."""

    origin: str
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class KnowledgeGraph:
    """A validated graph: ids unique, labels and types from the vocabulary, every endpoint a node of it."""

    nodes: tuple[NodeRecord, ...]
    relations: tuple[RelationRecord, ...]
    origin: str

    def node_by_id(self) -> dict[str, NodeRecord]:
        return {node.node_id: node for node in self.nodes}


def _pydantic_problems(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "record"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parts.append(f"{field} is not a known field (check its spelling)")
        elif error["type"] == "missing":
            parts.append(f"{field} is missing")
        else:
            parts.append(message if message.startswith(field) else f"{field}: {message}")
    return "; ".join(parts)


def parse_jsonl(data: bytes, file_name: str) -> tuple[list[Located], list[str]]:
    """Split JSONL bytes into one object per line; invalid UTF-8, bad JSON or non-objects become problems.

    Blank lines are skipped; a UTF-8 byte-order mark on the first line is tolerated (editors add one).
    """
    located: list[Located] = []
    problems: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.rstrip(b"\r")
        where = f"{file_name} line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(
                f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
                "save the file as UTF-8"
            )
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix the line")
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}: expected one JSON object per line, found {type(value).__name__}")
            continue
        located.append(Located(where, value))
    return located, problems


def _records(
    located: Iterable[Located], model: type[RecordT], kind: str
) -> tuple[list[tuple[str, RecordT]], list[str]]:
    records: list[tuple[str, RecordT]] = []
    problems: list[str] = []
    id_field = "node_id" if model is NodeRecord else "relation_id"
    for item in located:
        try:
            records.append((item.origin, model.model_validate(dict(item.fields))))
        except ValidationError as exc:
            record_id = item.fields.get(id_field)
            label = f" {kind} {record_id}" if isinstance(record_id, str) and record_id else ""
            problems.append(f"{item.origin}:{label} {_pydantic_problems(exc)}")
    return records, problems


# ---------------------------------------------------------------------------------------------- validation


def _check_nodes(nodes: Sequence[tuple[str, NodeRecord]], vocabulary: Vocabulary) -> list[str]:
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for origin, node in nodes:
        if node.node_id in first_seen:
            problems.append(
                f"{origin}: duplicate node id {node.node_id} (first at {first_seen[node.node_id]}); "
                "give every node its own id"
            )
        else:
            first_seen[node.node_id] = origin
        if node.label not in vocabulary.node_labels:
            problems.append(
                f"{origin}: node {node.node_id} has label {node.label!r}, which is not in the vocabulary "
                f"({', '.join(vocabulary.node_labels)})"
            )
        if node.category not in vocabulary.categories:
            problems.append(
                f"{origin}: node {node.node_id} has category {node.category!r}; use one of "
                f"{', '.join(vocabulary.categories)}"
            )
    problems.extend(_check_places(nodes))
    return problems


def _check_places(nodes: Sequence[tuple[str, NodeRecord]]) -> list[str]:
    """Every node's volume / chapter / section must name existing structure nodes that nest correctly."""
    volumes = {node.name for _, node in nodes if node.label == "Volume"}
    chapters = {(node.volume, node.name) for _, node in nodes if node.label == "Chapter"}
    sections = {(node.volume, node.chapter, node.name) for _, node in nodes if node.label == "Section"}
    own_place = {"Volume": "volume", "Chapter": "chapter", "Section": "section"}
    problems: list[str] = []
    for origin, node in nodes:
        who = f"{origin}: node {node.node_id} ({node.name})"
        field = own_place.get(node.label)
        if field and getattr(node, field) != node.name:
            problems.append(f"{who}: a {node.label} node's {field} must be its own name {node.name!r}")
            continue
        if node.volume not in volumes:
            problems.append(f"{who}: volume {node.volume!r} is not the name of any Volume node")
        elif node.label == "Volume" and (node.chapter or node.section):
            problems.append(f"{who}: a Volume node has no chapter or section; set them to null")
        elif node.chapter and (node.volume, node.chapter) not in chapters:
            problems.append(f"{who}: chapter {node.chapter!r} is not a Chapter node of {node.volume}")
        elif node.section and not node.chapter:
            problems.append(f"{who}: section {node.section!r} is given without its chapter")
        elif node.section and (node.volume, node.chapter, node.section) not in sections:
            problems.append(
                f"{who}: section {node.section!r} is not a Section node of {node.volume} {node.chapter}"
            )
        elif node.label in ("Section", "Item") and not node.section:
            problems.append(f"{who}: a {node.label} node needs its section")
        elif node.label == "Chapter" and node.section:
            problems.append(f"{who}: a Chapter node has no section; set it to null")
    return problems


# A structural relation must agree with the places written on its target: (source field, target field).
STRUCTURAL_PLACES = {"HAS_CHAPTER": "volume", "HAS_SECTION": "chapter", "HAS_ITEM": "section"}


def _check_relations(
    relations: Sequence[tuple[str, RelationRecord]],
    nodes_by_id: Mapping[str, NodeRecord],
    vocabulary: Vocabulary,
) -> list[str]:
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    triples: dict[tuple[str, str, str], str] = {}
    for origin, relation in relations:
        who = f"{origin}: relation {relation.relation_id} ({relation.relation_type})"
        if relation.relation_id in first_seen:
            problems.append(
                f"{origin}: duplicate relation id {relation.relation_id} (first at "
                f"{first_seen[relation.relation_id]}); give every relation its own id"
            )
        else:
            first_seen[relation.relation_id] = origin
        rule = vocabulary.relation_types.get(relation.relation_type)
        if rule is None:
            problems.append(
                f"{who}: unknown relation type {relation.relation_type!r}; use one of "
                f"{', '.join(vocabulary.relation_types)} or add it to vocabulary.yaml"
            )
        for end, node_id, allowed in (
            ("source", relation.source_id, rule.source if rule else None),
            ("target", relation.target_id, rule.target if rule else None),
        ):
            node = nodes_by_id.get(node_id)
            label = node.label if node else None
            if label is None:
                problems.append(f"{who} points to missing {end} node {node_id}; add the node or fix the id")
            elif allowed is not None and label not in allowed:
                problems.append(
                    f"{who}: {end} {node_id} is a {label}, but {relation.relation_type} {end}s must be "
                    f"{' or '.join(allowed)}"
                )
        if relation.source_id == relation.target_id:
            problems.append(f"{who} links node {relation.source_id} to itself")
        place_field = STRUCTURAL_PLACES.get(relation.relation_type)
        source, target = nodes_by_id.get(relation.source_id), nodes_by_id.get(relation.target_id)
        if place_field and source and target and getattr(target, place_field) != source.name:
            problems.append(
                f"{who}: {relation.target_id} ({target.name}) has {place_field} "
                f"{getattr(target, place_field)!r}, but the relation places it under {source.name!r}; "
                "make them agree"
            )
        triple = (relation.source_id, relation.relation_type, relation.target_id)
        if triple in triples:
            problems.append(f"{who} repeats the relation at {triples[triple]}; keep one of them")
        else:
            triples[triple] = origin
    return problems


def build_graph(
    node_items: Iterable[Located],
    relation_items: Iterable[Located],
    vocabulary: Vocabulary,
    origin: str,
    problems: Sequence[str] = (),
) -> KnowledgeGraph:
    """Validate raw records into a graph; raise ``KnowledgeGraphError`` listing every problem found.

    Two stages: records that cannot be read (``problems`` from parsing, missing or mistyped fields) are
    reported alone, because the graph checks would only repeat them as missing nodes; once every record
    reads, the graph checks (ids, vocabulary, places, endpoints) report everything they find.
    """
    nodes, node_problems = _records(node_items, NodeRecord, "node")
    relations, relation_problems = _records(relation_items, RelationRecord, "relation")
    unreadable = [*problems, *node_problems, *relation_problems]
    if unreadable:
        raise KnowledgeGraphError(origin, unreadable)
    graph_problems = _check_nodes(nodes, vocabulary)
    graph_problems += _check_relations(relations, {node.node_id: node for _, node in nodes}, vocabulary)
    if not nodes:
        graph_problems.append(
            "the graph has no nodes (on a graph server: check NEO4J_DATABASE, or load the seed into it with "
            "the kg_publish job)"
        )
    if graph_problems:
        raise KnowledgeGraphError(origin, graph_problems)
    return KnowledgeGraph(
        nodes=tuple(sorted((node for _, node in nodes), key=lambda node: node.node_id)),
        relations=tuple(sorted((rel for _, rel in relations), key=lambda rel: rel.relation_id)),
        origin=origin,
    )


def load_seed(folder: Path | None = None, vocabulary: Vocabulary | None = None) -> KnowledgeGraph:
    """Read and validate ``nodes.jsonl`` + ``relations.jsonl`` from ``folder`` (default: the shipped seed)."""
    vocabulary = vocabulary or load_vocabulary()
    if folder is None:
        base = resources.files("jpslm_assets") / "data" / "kg"
        origin = "the shipped seed (jpslm_assets/data/kg)"
        read = {name: (base / name).read_bytes() for name in (NODES_FILE, RELATIONS_FILE)}
    else:
        folder = Path(folder)
        origin = f"seed folder {folder}"
        missing = [name for name in (NODES_FILE, RELATIONS_FILE) if not (folder / name).is_file()]
        if missing:
            raise KnowledgeGraphError(
                origin, [f"{', '.join(missing)} not found in {folder}; the seed needs both JSONL files"]
            )
        read = {name: (folder / name).read_bytes() for name in (NODES_FILE, RELATIONS_FILE)}
    node_items, node_problems = parse_jsonl(read[NODES_FILE], NODES_FILE)
    relation_items, relation_problems = parse_jsonl(read[RELATIONS_FILE], RELATIONS_FILE)
    return build_graph(node_items, relation_items, vocabulary, origin, node_problems + relation_problems)


# ---------------------------------------------------------------------------------------------- graph version


def graph_version(graph: KnowledgeGraph) -> str:
    """A content hash of the graph (nodes and relations in id order), independent of where it was read."""
    digest = hashlib.sha256()
    for record in (*graph.nodes, *graph.relations):
        digest.update(json.dumps(record.model_dump(), ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:24]
