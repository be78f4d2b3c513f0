"""A Hugging Face folder in transformers as a generation backend (greedy), NF4 through bitsandbytes.

``torch`` and ``transformers`` are imported inside methods: importing this module is cheap.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.export.fidelity import ScoringSequence, SequenceNll, answer_token_nll
from jpslm_assets.resources.generation import Deployment, DeploymentRequest, GenerationBackend
from jpslm_assets.resources.loaded_models import HF_MODELS, HF_TOKENIZERS


class TransformersBackend(GenerationBackend):
    """A Hugging Face folder in transformers, greedy; ``quantization='nf4'`` loads it with bitsandbytes."""

    backend_name: ClassVar[str] = "transformers"

    device: str = Field(default="auto", description="auto | cpu | cuda")
    quantization: Literal["none", "nf4"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float32 on CPU, bfloat16 on CUDA"
    )
    max_loaded_models: int = Field(default=1, gt=0)

    def _device(self) -> str:
        import torch

        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def availability(self) -> tuple[bool, str]:
        """NF4 needs bitsandbytes on CUDA; 16/32-bit loading works anywhere."""
        if self.quantization != "nf4":
            return True, "transformers loads the folder unquantized"
        import torch

        if not torch.cuda.is_available():
            return (
                False,
                "HF + bitsandbytes NF4 needs CUDA and torch.cuda.is_available() is False on this machine",
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            return False, f"bitsandbytes is not importable ({exc}); `pip install bitsandbytes`"
        return True, "HF + bitsandbytes NF4 on CUDA"

    def load(self, model_ref: str) -> tuple[Any, Any]:
        folder = Path(model_ref)
        if not (folder / "config.json").is_file():
            raise self._error(
                model_ref, "not a Hugging Face model folder (no config.json); materialize merged_model"
            )
        available, reason = self.availability()
        if not available:
            raise self._error(model_ref, reason)
        key = (
            str(folder.resolve()),
            (folder / "config.json").stat().st_mtime_ns,
            self.quantization,
            self.dtype,
        )

        def load() -> tuple[Any, Any]:
            import torch
            from transformers import AutoModelForCausalLM

            from jpslm_assets.resources.models import load_tokenizer

            device = self._device()
            kwargs: dict[str, Any] = {}
            if self.quantization == "nf4":
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16,
                )
                kwargs["device_map"] = {"": 0}
            dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=getattr(torch, dtype), **kwargs
            )
            if self.quantization != "nf4":
                model = model.to(device)
            model.eval()
            return model, load_tokenizer(str(folder))

        return HF_MODELS.get(key, load, self.max_loaded_models)

    def tokenizer(self, model_ref: str) -> Any:
        """The folder's tokenizer alone (no weights), cached."""
        folder = Path(model_ref)
        if not folder.is_dir():
            raise self._error(model_ref, "not a folder; materialize merged_model")
        key = (
            str(folder.resolve()),
            max((p.stat().st_mtime_ns for p in folder.glob("tokenizer*")), default=0),
        )

        def load() -> Any:
            from jpslm_assets.resources.models import load_tokenizer

            return load_tokenizer(str(folder))

        return HF_TOKENIZERS.get(key, load, 4)

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        if request.grammar or request.json_schema is not None:
            raise self._error(
                model_ref, "constrained output (grammar / JSON schema) needs the llama_cpp or ollama backend"
            )
        import torch

        model, tokenizer = self.load(model_ref)
        if not tokenizer.chat_template:
            raise self._error(model_ref, "the tokenizer has no chat template; set one and re-materialize")
        encoded = tokenizer.apply_chat_template(
            list(request.messages), add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(model.device)
        kwargs: dict[str, Any] = {}
        if request.stop:
            kwargs.update(stop_strings=list(request.stop), tokenizer=tokenizer)
        if request.temperature > 0:
            torch.manual_seed(request.seed)
            kwargs.update(do_sample=True, temperature=request.temperature)
        else:
            kwargs.update(do_sample=False)
        prompt_tokens = int(encoded["input_ids"].shape[1])
        started = time.perf_counter()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            output = model.generate(
                **encoded, max_new_tokens=request.max_tokens, pad_token_id=pad_id, **kwargs
            )
        seconds = time.perf_counter() - started
        new_tokens = output[0, prompt_tokens:].tolist()
        eos_ids = model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        for stop in request.stop:
            text = text.split(stop)[0]
        stopped = bool(new_tokens) and new_tokens[-1] in eos_ids
        hit_limit = len(new_tokens) >= request.max_tokens and not stopped
        return GenerationResult(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_tokens),
            seconds=seconds,
            finish_reason="length" if hit_limit else "stop",
            backend=self.backend_name,
            model=model_ref,
            extra={"quantization": self.quantization},
        )

    def score(self, model_ref: str, sequences: Sequence[ScoringSequence]) -> list[SequenceNll]:
        """Answer-token NLL of each sequence from the HF model's logits."""
        import torch

        model, _ = self.load(model_ref)
        results = []
        with torch.no_grad():
            for sequence in sequences:
                ids = torch.tensor([list(sequence.ids)], device=model.device)
                logits = model(input_ids=ids).logits[0].float().cpu().numpy()
                results.append(answer_token_nll(logits, sequence))
        return results

    def deploy(self, request: DeploymentRequest) -> Deployment:
        if request.hf_dir is None:
            raise self._error(request.served_name, "deploying with transformers needs the merged HF folder")
        if request.format not in ("f16", "nf4"):
            return Deployment(
                self.backend_name,
                str(request.hf_dir),
                request.served_name,
                request.format,
                "unavailable",
                f"{request.format} is a llama.cpp format; serve it with the llama_cpp or ollama backend",
            )
        # f16 here means the merged 16-bit HF folder itself; nf4 loads it 4-bit with bitsandbytes.
        backend = (
            self if request.format != "nf4" else TransformersBackend(quantization="nf4", device=self.device)
        )
        available, reason = backend.availability()
        return Deployment(
            backend=self.backend_name,
            model_ref=str(request.hf_dir),
            served_name=request.served_name,
            quantization="nf4" if request.format == "nf4" else "16bit",
            status="ok" if available else "unavailable",
            detail=reason,
        )
