"""Merging a LoRA / QLoRA adapter into its base model at 16 bit, and saving a folder llama.cpp can convert.

Memory: the base is loaded once in 16 bit (``low_cpu_mem_usage``: weights stream from disk into the final
tensors, so an 8B model needs about its own size in RAM, not twice), the adapter is merged in place and the
result is saved in shards. A QLoRA adapter is merged onto the *un-quantized* base: merging into NF4 weights
would round the update away and bake quantization error into the 16-bit export.

Tokenizer files: transformers 5 ``save_pretrained`` writes ``tokenizer.json`` but drops ``tokenizer.model``
and ``added_tokens_decoder``. llama.cpp's converter reads exactly those two for SentencePiece models: without
them chat markers such as ``<|im_end|>`` become plain text in the GGUF. They are copied back here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jpslm_assets.resources.llama_cpp_tools import partial_path, replace_atomically

TOKENIZER_SIDE_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json")
# Everything that defines a tokenizer and its chat layout; copied verbatim when the source is a local folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", *TOKENIZER_SIDE_FILES,
)  # fmt: skip


class MergeError(RuntimeError):
    """The adapter or base cannot be merged; the message names the folder and the fix."""


@dataclass(frozen=True)
class MergeResult:
    path: Path
    dtype: str
    parameters: int
    tokenizer_source: str
    chat_template: str | None


def _is_local_folder(ref: str) -> bool:
    return Path(ref).expanduser().is_dir()


def check_adapter_folder(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise MergeError(
            f"adapter folder {adapter_dir} does not exist; re-materialize lora_adapter for this model and n."
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(
            f"{adapter_dir} has no adapter_config.json, so it is not a PEFT adapter; re-materialize lora_adapter."
        )


def tokenizer_source_folder(adapter_dir: Path, base_ref: str) -> Path | None:
    """Where the tokenizer files come from: the adapter folder when training saved one, else the base."""
    for candidate in (adapter_dir, Path(base_ref).expanduser()):
        if candidate.is_dir() and (
            (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer.model").is_file()
        ):
            return candidate
    return None


def sixteen_bit_dtype(config: Any) -> Any:
    """Keep the base's own 16-bit type (bf16 for Llama-3); other bases (fp32 tiny models) merge in fp16."""
    import torch

    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if declared in (torch.bfloat16, "bfloat16"):
        return torch.bfloat16
    return torch.float16


def restore_tokenizer_files(saved: Path, sources: list[Path]) -> list[str]:
    """Copy files transformers 5 dropped (tokenizer.model, ...) and rebuild ``added_tokens_decoder``.

    Returns the names of the files restored.
    """
    restored = []
    for name in TOKENIZER_SIDE_FILES:
        if (saved / name).exists():
            continue
        for source in sources:
            if (source / name).is_file():
                shutil.copy2(source / name, saved / name)
                restored.append(name)
                break
    config_file = saved / "tokenizer_config.json"
    tokenizer_json = saved / "tokenizer.json"
    if config_file.is_file() and tokenizer_json.is_file():
        config = json.loads(config_file.read_text("utf-8"))
        added = json.loads(tokenizer_json.read_text("utf-8")).get("added_tokens", [])
        if added and not config.get("added_tokens_decoder"):
            config["added_tokens_decoder"] = {
                str(token["id"]): {
                    key: token[key]
                    for key in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
                    if key in token
                }
                for token in added
            }
            config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
            restored.append("added_tokens_decoder")
    return restored


def _metaspace_schemes(component: dict[str, Any] | None) -> list[str]:
    """Prepend schemes of every Metaspace (or Prepend normalizer) inside a tokenizers component."""
    if not component:
        return []
    kind = component.get("type")
    if kind == "Metaspace":
        if "prepend_scheme" in component:
            return [str(component["prepend_scheme"])]
        return ["always" if component.get("add_prefix_space", True) else "never"]
    if kind == "Prepend" and component.get("prepend") == "\u2581":
        return ["always"]
    schemes: list[str] = []
    for key in ("pretokenizers", "normalizers"):
        for child in component.get(key) or []:
            schemes += _metaspace_schemes(child)
    return schemes


def gguf_tokenizer_overrides(model_dir: Path) -> dict[str, Any]:
    """GGUF tokenizer keys that make llama.cpp tokenize like HF does when it *loads* this folder.

    SentencePiece vocabularies: llama.cpp either adds the word-start marker after every special token
    (``add_space_prefix`` true, its default, like HF's legacy "always" scheme) or never. HF's current
    schemes are "first" (only at the very start of a text) and "never". Chat prompts start with a special
    token, so for them "first" behaves as "never". The converter sets the key for some architectures only
    (Llama reads ``add_prefix_space``, Qwen2 does not), so it is written explicitly. The gguf asset checks
    the outcome by comparing token ids on the whole test set.
    """
    from jpslm_assets.resources.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    state = json.loads(backend.to_str())
    schemes = _metaspace_schemes(state.get("pre_tokenizer")) + _metaspace_schemes(state.get("normalizer"))
    if not schemes:
        return {}  # byte-level BPE (Llama 3, Qwen): no word-start marker to decide
    return {"tokenizer.ggml.add_space_prefix": schemes[0] == "always"}


def merge_adapter(
    base_ref: str,
    adapter_dir: Path,
    out_dir: Path,
    trust_remote_code: bool = False,
    max_shard_size: str = "2GB",
) -> MergeResult:
    """Merge ``adapter_dir`` into ``base_ref`` (local folder or HF id) at 16 bit and save to ``out_dir``.

    The folder is written under a temporary name and renamed into place, so ``out_dir`` is either the
    previous complete export or the new complete one.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from jpslm_assets.resources.models import load_tokenizer

    adapter_dir = Path(adapter_dir)
    check_adapter_folder(adapter_dir)
    if not _is_local_folder(base_ref) and ("/" not in base_ref or base_ref.startswith((".", "/"))):
        raise MergeError(
            f"base model {base_ref!r} is neither a local folder nor a Hugging Face id; "
            "re-materialize base_model or fix base_model_ref in train.runs."
        )
    try:
        config = AutoConfig.from_pretrained(base_ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot read the config of base model {base_ref!r}: {exc}") from exc
    dtype = sixteen_bit_dtype(config)
    model = AutoModelForCausalLM.from_pretrained(
        base_ref, dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=trust_remote_code
    )
    try:
        with_adapter = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise MergeError(
            f"adapter {adapter_dir} does not fit base model {base_ref!r} ({exc}); retrain the adapter on this base."
        ) from exc
    merged: Any = with_adapter.merge_and_unload()
    parameters = sum(parameter.numel() for parameter in merged.parameters())

    source = tokenizer_source_folder(adapter_dir, base_ref)
    tokenizer = load_tokenizer(str(source) if source else base_ref, trust_remote_code=trust_remote_code)
    out_dir = Path(out_dir)
    scratch = partial_path(out_dir)
    try:
        with torch.no_grad():
            merged.save_pretrained(scratch, max_shard_size=max_shard_size, safe_serialization=True)
        if source is not None:
            # Verbatim copies: re-saving through transformers 5 would drop keys (legacy, add_prefix_space,
            # added_tokens_decoder) that decide how the tokenizer behaves when loaded again.
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, scratch / name)
        else:
            tokenizer.save_pretrained(scratch)
            restore_tokenizer_files(scratch, [])
        # The adapter's generation config (stop ids) beats the base's, if training saved one.
        for name in ("generation_config.json",):
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, scratch / name)
        replace_atomically(scratch, out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return MergeResult(
        path=out_dir,
        dtype=str(dtype).removeprefix("torch."),
        parameters=int(parameters),
        tokenizer_source=str(source) if source else base_ref,
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    )
