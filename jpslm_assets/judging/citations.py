"""Citation grounding without an LLM: does an answer point at the standards, and at the right place?

The rubric's top score asks for a citation (volume, chapter, section). Whether an answer *has* one, and
whether it matches where the knowledge graph places the question's nodes, can be read off the text: volume
names and their aliases (from the rubric file), ``第N章`` / ``Chapter N`` and ``第N節`` / ``Section N``
patterns, and chapter or section titles in quotation marks (「河川堤防」; compared fuzzily with rapidfuzz). This gives a check on
the judge that no model's opinion enters.

Match levels, most specific first: ``section`` (a cited section number or title equals the expected one),
``chapter``, ``volume``, ``none``. Citing only volumes (or only chapters) other than the expected ones is a
contradiction and never matches, whatever else the answer also cites.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from rapidfuzz import fuzz

from jpslm_assets.judging.rubric import CitationVocabulary, JudgeInputError
from jpslm_assets.judging.scoring import as_id_list, require_columns

_KANJI_DIGITS = {
    "〇": 0,
    "零": 0,
    "一": 1,
    "二": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}
_KANJI_UNITS = {"十": 10, "百": 100}


def kanji_number(text: str) -> int | None:
    """``三`` -> 3, ``十二`` -> 12, ``二十`` -> 20, ``百五`` -> 105; Arabic digits pass through."""
    text = unicodedata.normalize("NFKC", text).strip()
    if text.isdigit():
        return int(text)
    total, current = 0, 0
    for char in text:
        if char in _KANJI_DIGITS:
            current = _KANJI_DIGITS[char]
        elif char in _KANJI_UNITS:
            total += (current or 1) * _KANJI_UNITS[char]
            current = 0
        else:
            return None
    total += current
    return total if text else None


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text or "")


@dataclass(frozen=True)
class ExpectedLocation:
    """Where the knowledge graph puts a question's nodes (possibly several places)."""

    volumes: frozenset[str] = frozenset()
    chapters: frozenset[str] = frozenset()
    sections: frozenset[str] = frozenset()
    chapter_titles: frozenset[str] = frozenset()
    section_titles: frozenset[str] = frozenset()
    text: str | None = None

    @property
    def verifiable(self) -> bool:
        return bool(
            self.volumes or self.chapters or self.sections or self.chapter_titles or self.section_titles
        )


@dataclass(frozen=True)
class CitedLocation:
    volumes: frozenset[str] = frozenset()
    chapters: frozenset[str] = frozenset()
    sections: frozenset[str] = frozenset()
    chapter_titles: frozenset[str] = frozenset()
    section_titles: frozenset[str] = frozenset()

    @property
    def any(self) -> bool:
        return bool(
            self.volumes or self.chapters or self.sections or self.chapter_titles or self.section_titles
        )


@dataclass(frozen=True)
class Grounding:
    cites_location: bool
    citation_matches: bool | None
    match_level: str
    cited: CitedLocation
    expected: ExpectedLocation
    notes: list[str] = field(default_factory=list)


class CitationReader:
    """Reads volumes, chapter and section numbers out of text using the rubric's citation vocabulary."""

    def __init__(self, vocabulary: CitationVocabulary) -> None:
        self.vocabulary = vocabulary
        self._aliases: list[tuple[str, str]] = sorted(
            (
                (_normalize(alias).lower(), canonical)
                for canonical, aliases in vocabulary.volumes.items()
                for alias in [canonical, *aliases]
            ),
            key=lambda pair: -len(pair[0]),
        )
        self._chapter = [re.compile(_normalize(p)) for p in vocabulary.chapter_patterns]
        self._section = [re.compile(_normalize(p)) for p in vocabulary.section_patterns]

    # -- reading the knowledge graph's fields

    def canonical_volume(self, value: str) -> str:
        """The rubric's name for a volume value from the graph (``設計編``), else the value itself."""
        text = _normalize(value).lower()
        for alias, canonical in self._aliases:
            if alias in text:
                return canonical
        return _normalize(value).strip()

    def _number_and_title(self, value: str, patterns: Sequence[re.Pattern[str]]) -> tuple[str | None, str]:
        text = _normalize(value).strip()
        for pattern in patterns:
            found = pattern.search(text)
            if found:
                number = _number_text(found.group(1))
                title = (text[: found.start()] + " " + text[found.end() :]).strip(" :：.-　")
                return number, title
        # A bare "3" or "3.2", or "3 Levees" / "3.2 堤防の設計": a leading number is the number.
        leading = re.match(r"^([0-9]+(?:\.[0-9]+)*)[\s.:：)）]*(.*)$", text)
        if leading:
            return leading.group(1), leading.group(2).strip()
        return None, text

    def expected_location(
        self, nodes: Iterable[Mapping[str, Any]], fallback_citation: str | None
    ) -> ExpectedLocation:
        volumes: set[str] = set()
        chapters: set[str] = set()
        sections: set[str] = set()
        chapter_titles: set[str] = set()
        section_titles: set[str] = set()
        texts: list[str] = []
        for node in nodes:
            parts = []
            if _present(node.get("volume")):
                volumes.add(self.canonical_volume(str(node["volume"])))
                parts.append(str(node["volume"]))
            if _present(node.get("chapter")):
                number, title = self._number_and_title(str(node["chapter"]), self._chapter)
                if number:
                    chapters.add(number)
                if len(title) >= self.vocabulary.title_min_chars:
                    chapter_titles.add(title)
                parts.append(str(node["chapter"]))
            if _present(node.get("section")):
                number, title = self._number_and_title(str(node["section"]), self._section)
                if number:
                    sections.add(number)
                if len(title) >= self.vocabulary.title_min_chars:
                    section_titles.add(title)
                parts.append(str(node["section"]))
            if parts:
                texts.append(" > ".join(parts))
        if not texts and fallback_citation:
            # No located nodes: read the test set's own citation text the same way an answer is read.
            cited = self.read(fallback_citation)
            return ExpectedLocation(
                frozenset(cited.volumes),
                frozenset(cited.chapters),
                frozenset(cited.sections),
                text=str(fallback_citation),
            )
        return ExpectedLocation(
            frozenset(volumes),
            frozenset(chapters),
            frozenset(sections),
            frozenset(chapter_titles),
            frozenset(section_titles),
            "; ".join(dict.fromkeys(texts)) or None,
        )

    # -- reading an answer

    def read(self, text: str, expected: ExpectedLocation | None = None) -> CitedLocation:
        body = _normalize(text)
        lowered = body.lower()
        volumes = {canonical for alias, canonical in self._aliases if alias and alias in lowered}
        if expected is not None:
            # Volume names the graph uses but the rubric does not know still count when quoted verbatim.
            volumes |= {v for v in expected.volumes if v and _normalize(v).lower() in lowered}
        # 維持管理編（ダム編） also contains the bare 維持管理編: keep only the most specific name cited.
        volumes = {v for v in volumes if not any(other != v and other.startswith(v) for other in volumes)}
        chapters = {_number_text(m.group(1)) for p in self._chapter for m in p.finditer(body)}
        sections = {_number_text(m.group(1)) for p in self._section for m in p.finditer(body)}
        chapter_titles: set[str] = set()
        section_titles: set[str] = set()
        if expected is not None:
            chapter_titles = {t for t in expected.chapter_titles if self._quotes(body, t)}
            section_titles = {t for t in expected.section_titles if self._quotes(body, t)}
        return CitedLocation(
            frozenset(volumes),
            frozenset(c for c in chapters if c),
            frozenset(s for s in sections if s),
            frozenset(chapter_titles),
            frozenset(section_titles),
        )

    def _quotes(self, body: str, title: str) -> bool:
        # Only a quoted title is a citation: a chapter titled 河川堤防 is also the topic word every answer
        # about levees uses, so an unquoted mention proves nothing about where the answer looked.
        title = _normalize(title)
        if len(title) < self.vocabulary.title_min_chars:
            return False
        return any(
            fuzz.ratio(title, quoted) >= self.vocabulary.title_match_threshold
            for quoted in _quoted_spans(body)
        )

    def ground(self, answer: str, expected: ExpectedLocation) -> Grounding:
        cited = self.read(answer, expected)
        notes: list[str] = []
        if not expected.verifiable:
            return Grounding(
                cited.any, None, "unknown", cited, expected, ["no KG location for this question"]
            )
        section_hit = bool(cited.sections & expected.sections or cited.section_titles)
        chapter_hit = bool(cited.chapters & expected.chapters or cited.chapter_titles)
        # A bare volume name (維持管理編) matches each of its parts (維持管理編（河川編）).
        volume_hit = any(e == c or e.startswith(c) for c in cited.volumes for e in expected.volumes)
        if cited.volumes and expected.volumes and not volume_hit:
            notes.append(f"cites {sorted(cited.volumes)} but the question is in {sorted(expected.volumes)}")
            return Grounding(cited.any, False, "none", cited, expected, notes)
        if cited.chapters and expected.chapters and not chapter_hit:
            # Section numbers restart in every chapter: a wrong chapter makes a matching section number moot.
            notes.append(
                f"cites chapter(s) {sorted(cited.chapters)} but the question is in {sorted(expected.chapters)}"
            )
            return Grounding(cited.any, False, "none", cited, expected, notes)
        level = "section" if section_hit else "chapter" if chapter_hit else "volume" if volume_hit else "none"
        return Grounding(cited.any, level != "none", level, cited, expected, notes)


_QUOTED = re.compile(r"「([^」]{1,80})」|『([^』]{1,80})』|\"([^\"]{1,80})\"|“([^”]{1,80})”")


def _quoted_spans(text: str) -> list[str]:
    """Text inside Japanese or English quotation marks, with a trailing chapter/section word removed."""
    spans = []
    for match in _QUOTED.finditer(text):
        span = next(group for group in match.groups() if group is not None).strip()
        spans.append(re.sub(r"(の)?(章|節|編)$", "", span).strip())
    return spans


def _present(value: Any) -> bool:
    return value is not None and str(value).strip().lower() not in {"", "none", "null", "nan"}


def _number_text(raw: str) -> str:
    """Canonical text of a chapter/section number: ``三`` -> ``3``, ``３.２`` -> ``3.2``."""
    raw = _normalize(raw).strip()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)*", raw):
        return ".".join(str(int(part)) for part in raw.split("."))
    number = kanji_number(raw)
    return str(number) if number is not None else raw


CITATION_GROUNDING_SCHEMA: dict[str, pl.DataType] = {
    "question_id": pl.Utf8(),
    "category": pl.Utf8(),
    "cites_location": pl.Boolean(),
    "citation_matches": pl.Boolean(),
    "match_level": pl.Utf8(),
    "cited_volumes": pl.List(pl.Utf8()),
    "cited_chapters": pl.List(pl.Utf8()),
    "cited_sections": pl.List(pl.Utf8()),
    "expected_location": pl.Utf8(),
    "note": pl.Utf8(),
}


def ground_answers(
    answers: pl.DataFrame,
    test_set: pl.DataFrame,
    nodes: pl.DataFrame | None,
    vocabulary: CitationVocabulary,
    source: str,
) -> pl.DataFrame:
    """One grounding row per answer (``CITATION_GROUNDING_SCHEMA``); unknown question ids are an error."""
    require_columns(answers, ["question_id", "answer"], source)
    require_columns(test_set, ["question_id", "category"], "qa.test_set")
    questions = {str(row["question_id"]): row for row in test_set.iter_rows(named=True)}
    unknown = sorted({str(q) for q in answers.get_column("question_id").to_list()} - set(questions))
    if unknown:
        raise JudgeInputError(
            f"{source} has answers to question id(s) {unknown[:5]} that are not in qa.test_set; "
            "re-materialize the answers for this partition after the test set changed."
        )
    by_node: dict[str, Mapping[str, Any]] = {}
    if nodes is not None and nodes.height and "node_id" in nodes.columns:
        by_node = {str(row["node_id"]): row for row in nodes.iter_rows(named=True)}
    reader = CitationReader(vocabulary)
    rows = []
    for row in answers.iter_rows(named=True):
        question = questions[str(row["question_id"])]
        node_rows = [by_node[i] for i in as_id_list(question.get("node_ids")) if i in by_node]
        expected = reader.expected_location(node_rows, question.get("citation"))
        grounding = reader.ground(str(row["answer"] or ""), expected)
        rows.append(
            {
                "question_id": str(row["question_id"]),
                "category": question.get("category") or row.get("category"),
                "cites_location": grounding.cites_location,
                "citation_matches": grounding.citation_matches,
                "match_level": grounding.match_level,
                "cited_volumes": sorted(grounding.cited.volumes),
                "cited_chapters": sorted(grounding.cited.chapters),
                "cited_sections": sorted(grounding.cited.sections),
                "expected_location": expected.text,
                "note": "; ".join(grounding.notes) or None,
            }
        )
    return pl.DataFrame(rows, schema=CITATION_GROUNDING_SCHEMA)
