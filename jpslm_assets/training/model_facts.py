"""Architecture facts read from a model config, and the attention scheme they imply.

The paper labels the Llama-3 models "MHA"; their configs have 32 query heads sharing 8 KV heads, which is
grouped-query attention. These functions report what a config says, so the table can show where a label
and the config disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

AttentionKind = Literal["MHA", "GQA", "MQA"]


class ConfigFactError(ValueError):
    """A config lacks a field the facts need; the message names the model and the field."""


def attention_kind(heads: int, kv_heads: int) -> AttentionKind:
    """MHA when every query head has its own KV head, MQA when all share one, GQA in between."""
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ConfigFactError(f"{heads} attention heads cannot share {kv_heads} KV heads evenly")
    if kv_heads == heads:
        return "MHA"
    if kv_heads == 1:
        return "MQA"
    return "GQA"


def architecture_facts(
    model: str, config: Mapping[str, Any], parameters: int, paper_label: str | None
) -> dict[str, Any]:
    """One ``train.model_architecture`` row from a config dict (``PretrainedConfig.to_dict()``)."""

    def field(*names: str, required: bool = True) -> Any:
        for name in names:
            if config.get(name) is not None:
                return config[name]
        if required:
            raise ConfigFactError(
                f"model {model}: config has none of {names}; is it a decoder-only LM config?"
            )
        return None

    heads = int(field("num_attention_heads", "n_head"))
    kv_heads = int(field("num_key_value_heads", "num_kv_heads", required=False) or heads)
    hidden = int(field("hidden_size", "n_embd"))
    kind = attention_kind(heads, kv_heads)
    architectures = config.get("architectures") or []
    return {
        "model": model,
        "architecture": architectures[0] if architectures else None,
        "model_type": config.get("model_type"),
        "layers": int(field("num_hidden_layers", "n_layer")),
        "hidden_size": hidden,
        "intermediate_size": field("intermediate_size", required=False),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": int(config.get("head_dim") or hidden // heads),
        "gqa_ratio": heads / kv_heads,
        "attention_kind": kind,
        "paper_attention_label": paper_label,
        "matches_paper_label": None if paper_label is None else paper_label == kind,
        "vocab_size": int(field("vocab_size")),
        "max_position_embeddings": field("max_position_embeddings", required=False),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "parameters": int(parameters),
    }
