"""The Ollama path against a real server at OLLAMA_HOST (marker ``live_ollama``; skipped when none answers).

Creates a tiny model from a GGUF converted here, answers with it, and removes it again.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jpslm_assets.common.generation_types import GenerationError, GenerationRequest
from jpslm_assets.export.modelfile import build_modelfile
from jpslm_assets.resources.generation import DeploymentRequest
from jpslm_assets.resources.generation_ollama import OllamaBackend
from jpslm_assets.resources.llama_cpp_tools import LlamaCppTools
from jpslm_assets_tests.export_fixtures import CHATML, build_sentencepiece_base

pytestmark = pytest.mark.live_ollama


@pytest.fixture(scope="module")
def live() -> OllamaBackend:
    if not os.environ.get("OLLAMA_HOST"):
        pytest.skip("OLLAMA_HOST is not set")
    backend = OllamaBackend(num_ctx=512, timeout_s=120)
    reachable, reason = backend.reachable()
    if not reachable:
        pytest.skip(reason)
    return backend


@pytest.fixture(scope="module")
def served(live: OllamaBackend, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    root = tmp_path_factory.mktemp("live_ollama")
    tools = LlamaCppTools(cache_dir=str(request.config.cache.mkdir("llama-cpp-converter")))
    folder = build_sentencepiece_base(root / "hf")
    gguf = tools.convert_hf_to_gguf(folder, root / "tiny-f16.gguf",
                                    metadata_overrides={"tokenizer.ggml.add_space_prefix": False}).path
    spec = build_modelfile(
        CHATML, gguf.name, model="tiny", bos_token="<s>", eos_token="<|im_end|>", server_adds_bos=False,
        catalogue_stops=["<|im_end|>"], seed=42, temperature=0.0, num_ctx=512, num_predict=16,
    )  # fmt: skip
    name = f"jpslm-live-test-{uuid.uuid4().hex[:8]}:f16"
    deployment = live.deploy(DeploymentRequest("tiny-llama", 1, "f16", name, gguf_path=Path(gguf), modelfile=spec))
    assert deployment.backend == "ollama" and deployment.status == "ok", deployment
    yield name
    with live.client() as client:
        client.delete(name)


def test_live_ollama_answers_deterministically(live: OllamaBackend, served: str) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "堤防の点検は？"}], max_tokens=8)
    first, second = live.generate(served, request), live.generate(served, request)
    assert first.text == second.text
    assert first.backend == "ollama" and first.completion_tokens > 0
    assert first.finish_reason in {"stop", "length"}


def test_live_ollama_reports_length_and_unknown_models(live: OllamaBackend, served: str) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "河川"}], max_tokens=2)
    assert live.generate(served, request).finish_reason == "length"
    with pytest.raises(GenerationError, match="does not know this model"):
        live.generate(f"absent-{uuid.uuid4().hex[:6]}:latest", request)


def test_live_ollama_keeps_the_modelfile_parameters(live: OllamaBackend, served: str) -> None:
    with live.client() as client:
        shown = client.show(served)
    assert "seed" in (shown.parameters or "") and "num_ctx" in (shown.parameters or "")
    assert "<|im_start|>assistant" in (shown.template or "")
