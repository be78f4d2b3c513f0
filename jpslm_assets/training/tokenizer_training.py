"""A SentencePiece tokenizer for the randomly initialised demo models, trained on the QA corpus itself.

Why SentencePiece (not a byte-level BPE ``tokenizer.json``): llama.cpp's converter reads ``tokenizer.model``
directly and tokenizes identically to Hugging Face, while it refuses or mis-tokenizes BPE vocabularies it does
not know. ``byte_fallback`` makes any text encodable (unseen kanji become UTF-8 byte pieces), and identity
normalization keeps Hugging Face, SentencePiece and llama.cpp on the same ids.

The corpus is the pool's questions and answers rendered in the chat template, so the chat markers, role
names and newlines get their own pieces, plus one line with printable ASCII so Latin letters, digits and the
space marker exist as pieces too.
"""

from __future__ import annotations

import io
import string
from collections.abc import Iterable, Sequence
from typing import Any

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
# SentencePiece ids 0-3 are the classic control symbols; the chat markers follow as ids 4 and 5.
RESERVED_PIECES = (UNK, BOS, EOS, PAD, *CHATML_MARKERS)


class TokenizerTrainingError(ValueError):
    """The corpus cannot produce a tokenizer; the message says which input to fix."""


def render_conversations(pairs: Iterable[tuple[str, str]], chat_template: str) -> list[str]:
    """Each (question, answer) rendered as a complete chat exchange with the given Jinja template (transformers'
    own renderer, as the trained tokenizer's ``apply_chat_template`` will render it)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    if not conversations:
        return []
    rendered = render_jinja_template(
        conversations=conversations, chat_template=chat_template, add_generation_prompt=False
    )[0]  # (texts, generation indices)
    return [str(text) for text in rendered]


def coverage_line() -> str:
    """Printable ASCII separated by spaces, so the pieces for Latin text and the space marker exist."""
    return " ".join(string.ascii_letters + string.digits + string.punctuation)


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model (the bytes of ``tokenizer.model``), at most ``vocab_size`` pieces.

    Small corpora yield fewer pieces than asked (``hard_vocab_limit`` off); the model's embedding keeps the
    configured vocabulary size and the spare rows stay unused.
    """
    import sentencepiece as spm

    sentences = [text for text in texts if text.strip()]
    if not sentences:
        raise TokenizerTrainingError(
            "the tokenizer corpus is empty: materialize rebalanced_pool with at least one question and answer."
        )
    minimum = 256 + len(RESERVED_PIECES) + 64  # byte pieces + reserved + room for merges
    if vocab_size < minimum:
        raise TokenizerTrainingError(
            f"vocab_size={vocab_size} is too small for a byte-fallback tokenizer; use at least {minimum} "
            "(catalogue config vocab_size)."
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*sentences, coverage_line()]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        user_defined_symbols=list(CHATML_MARKERS),
        num_threads=1,  # one thread keeps the merges deterministic
        minloglevel=2,
    )
    return model.getvalue()


def tokenizer_config(chat_template: str, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for a Llama-style SentencePiece tokenizer with ChatML markers as specials.

    ``added_tokens_decoder`` is written out in full because llama.cpp's converter reads it to mark the chat
    markers as control tokens (without it they become plain text there).
    """
    added = {
        str(index): {
            "content": piece,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for index, piece in enumerate(RESERVED_PIECES)
    }
    return {
        "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": CHATML_MARKERS[1],
        "unk_token": UNK,
        "pad_token": PAD,
        "extra_special_tokens": list(CHATML_MARKERS),
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }


def special_token_ids() -> dict[str, int]:
    """Ids of the reserved pieces, fixed by :func:`train_sentencepiece`."""
    return {piece: index for index, piece in enumerate(RESERVED_PIECES)}
