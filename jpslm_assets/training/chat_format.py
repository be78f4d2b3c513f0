"""How a QA pair becomes a training or scoring sequence: chat prompt tokens, then answer tokens.

Training and test-set scoring share this one encoding, so the NLL is measured on exactly the sequence shape
the adapter was trained on, and serving (which sends the same chat messages) sees the same prompt. The prompt
and the answer are tokenized separately and concatenated: the prompt is then an exact token prefix of the
sequence by construction, which is the condition for masking it (labels ``-100``) without off-by-one errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


class EncodingError(ValueError):
    """A record cannot be encoded within the sequence budget; the message names the record and the fix."""


class PromptTooLongError(EncodingError):
    """The prompt alone fills the sequence budget, leaving no answer token to learn or score."""


@dataclass(frozen=True)
class EncodedExample:
    record_id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions, token ids on answer positions

    @property
    def prompt_tokens(self) -> int:
        return sum(1 for label in self.labels if label == IGNORE_INDEX)

    @property
    def answer_tokens(self) -> int:
        return len(self.labels) - self.prompt_tokens


def chat_messages(question: str) -> list[dict[str, str]]:
    """The messages every stage sends for a question: one user turn, no extra system prompt.

    Serving must send the same list so that the deployed model sees the prompt it was trained on.
    """
    return [{"role": "user", "content": question}]


def chat_template_text(name: str) -> str:
    """A Jinja chat template shipped in ``jpslm_assets/data/chat_templates/<name>.jinja``."""
    folder = resources.files("jpslm_assets") / "data" / "chat_templates"
    path = folder / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))
        raise ValueError(
            f"chat template {name!r} is not shipped; known templates: {', '.join(known)} "
            "(add a .jinja file to jpslm_assets/data/chat_templates/)."
        )
    return path.read_text("utf-8")


def render_prompt(tokenizer: ChatTokenizer, question: str) -> str:
    """The prompt text up to and including the assistant header that precedes the answer."""
    return str(
        tokenizer.apply_chat_template(chat_messages(question), add_generation_prompt=True, tokenize=False)
    )


def encode_pair(
    tokenizer: ChatTokenizer,
    question: str,
    answer: str,
    end_of_turn: str,
    max_length: int,
    record_id: str = "?",
) -> EncodedExample:
    """Token ids and labels for one QA pair; the answer ends with the model's end-of-turn marker.

    Sequences longer than ``max_length`` keep their start (prompt first, then as much answer as fits), as
    the trainer would. A prompt that leaves no room for a single answer token is an error: it would add a
    sequence with no loss.
    """
    prompt_ids = list(tokenizer(render_prompt(tokenizer, question), add_special_tokens=False)["input_ids"])
    answer_ids = list(tokenizer(answer + end_of_turn, add_special_tokens=False)["input_ids"])
    if not answer_ids:
        raise EncodingError(f"record {record_id}: the answer is empty; fix or drop the record.")
    if len(prompt_ids) >= max_length:
        raise PromptTooLongError(
            f"record {record_id}: the prompt alone is {len(prompt_ids)} tokens, which leaves no answer tokens "
            f"within max_seq_length={max_length}; raise max_seq_length (profile train.max_seq_length or run "
            "config) or shorten the question."
        )
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return EncodedExample(record_id=record_id, input_ids=input_ids, labels=labels)


def encode_pairs(
    tokenizer: ChatTokenizer,
    records: list[tuple[str, str, str]],
    end_of_turn: str,
    max_length: int,
) -> list[EncodedExample]:
    """Encode ``(record_id, question, answer)`` triples, in order; any record that does not fit is an error."""
    return [
        encode_pair(tokenizer, question, answer, end_of_turn, max_length, record_id=record_id)
        for record_id, question, answer in records
    ]


def encode_training_pairs(
    tokenizer: ChatTokenizer,
    records: list[tuple[str, str, str]],
    end_of_turn: str,
    max_length: int,
) -> tuple[list[EncodedExample], list[str]]:
    """Encode training triples, leaving out those whose prompt alone fills ``max_length``.

    Such a record has no answer token to learn from (the trainer would drop it after truncation anyway);
    its id is returned so the caller can report it rather than lose it silently.
    """
    examples: list[EncodedExample] = []
    skipped: list[str] = []
    for record_id, question, answer in records:
        try:
            examples.append(
                encode_pair(tokenizer, question, answer, end_of_turn, max_length, record_id=record_id)
            )
        except PromptTooLongError:
            skipped.append(record_id)
    return examples, skipped
