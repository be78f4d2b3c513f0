"""Evaluation throughput on one CUDA GPU: 100 questions answered by an 8B-shaped Q4_K_M GGUF via llama-server.

The answering loop is the one the ``answers_*`` assets run (``jpslm_assets.export.answering.answer_questions``)
against the project's ``LlamaServerBackend``, which starts llama.cpp's ``llama-server`` with parallel slots and
sends each question as an OpenAI-style chat request; ``--parallel`` requests run at once. The same loop with one
request at a time, on the first ``--sequential`` questions, is measured in the same run as the reference.

Steps (each skipped when its output exists):
1. build ``llama-server`` and ``llama-quantize`` with CUDA from a llama.cpp source tree or tarball
   (``--llama-src``; sm_90 for Hopper unless ``--cuda-arch`` says otherwise), in parallel with 2-3;
2. an 8B Llama-3-shaped model with random weights, built on the GPU (``bench_gpu_training.prepare``);
3. GGUF F16 with the source tree's ``convert_hf_to_gguf.py``, then Q4_K_M with ``llama-quantize``;
4. the timed runs.

Random weights never choose the end-of-turn token, so every answer runs to ``--max-new-tokens`` (default 384,
about the paper's 310-380-character answers): a worst case for the decoder, reported with the token counts.

    python benchmarks/bench_gpu_answers.py --work /tmp/bench --llama-src llama-cpp-src.tar.gz --parallel 32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_SET = ROOT / "jpslm_assets" / "data" / "test_set_200.jsonl"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 42


def source_tree(source: Path, work: Path) -> Path:
    if source.is_dir():
        return source
    target = work / "llama-src"
    if not (target / "CMakeLists.txt").is_file():
        with tarfile.open(source) as archive:
            archive.extractall(work / "llama-src-unpack", filter="data")
        inner = next(p for p in (work / "llama-src-unpack").iterdir() if (p / "CMakeLists.txt").is_file())
        inner.rename(target)
    return target


def start_build(tree: Path, build: Path, arch: str, jobs: int) -> subprocess.Popen[str] | None:
    if (build / "bin" / "llama-server").is_file() and (build / "bin" / "llama-quantize").is_file():
        log("llama.cpp already built")
        return None
    configure = [
        "cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]  # fmt: skip
    compile_ = ["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-server", "llama-quantize"]
    script = f"{' '.join(configure)} > {build}.log 2>&1 && {' '.join(compile_)} >> {build}.log 2>&1"
    log(f"building llama.cpp with CUDA (sm_{arch}, {jobs} jobs); log in {build}.log")
    return subprocess.Popen(["bash", "-c", script], text=True)


def convert(tree: Path, model: Path, f16: Path) -> float:
    if f16.is_file():
        return 0.0
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": f"{tree / 'gguf-py'}:{os.environ.get('PYTHONPATH', '')}"}
    partial = f16.with_suffix(".partial")
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16"]
    completed = subprocess.run(
        [*command, "--outfile", str(partial)], env=env, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf failed:\n{(completed.stdout + completed.stderr)[-3000:]}")
    partial.rename(f16)
    return time.monotonic() - started


def quantize(binary: Path, f16: Path, q4: Path) -> float:
    if q4.is_file():
        return 0.0
    started = time.monotonic()
    partial = q4.with_suffix(".partial")
    completed = subprocess.run(
        [str(binary), str(f16), str(partial), "Q4_K_M", str(os.cpu_count() or 4)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"llama-quantize failed:\n{(completed.stdout + completed.stderr)[-3000:]}")
    partial.rename(q4)
    return time.monotonic() - started


def questions(count: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in TEST_SET.read_text("utf-8").splitlines() if line.strip()]
    human = sorted((r for r in rows if r.get("human_written")), key=lambda r: r["question_id"])
    return human[:count]


def timed(
    backend: Any, gguf: Path, asked: list[dict[str, Any]], settings: Settings, concurrency: int
) -> dict:
    from jpslm_assets.export.answering import answer_questions

    answered = answer_questions(backend, str(gguf), asked, settings, ("<|im_end|>",), concurrency)
    results = answered.results
    tokens = sum(r.completion_tokens for r in results)
    latencies = sorted(r.seconds for r in results)
    return {
        "questions": len(results),
        "concurrency": answered.concurrency,
        "wall_seconds": answered.wall_seconds,
        "completion_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "tokens_per_s": tokens / answered.wall_seconds,
        "seconds_per_question": answered.wall_seconds / len(results),
        "latency_median_s": statistics.median(latencies),
        "latency_max_s": latencies[-1],
        "hit_max_tokens": sum(r.finish_reason == "length" for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--llama-src", type=Path, required=True, help="llama.cpp source folder or .tar.gz")
    parser.add_argument("--cuda-arch", default="90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument(
        "--sequential", type=int, default=6, help="questions answered one at a time, for reference"
    )
    parser.add_argument("--parallel", type=int, default=32, help="server slots and concurrent requests")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    spec = importlib.util.spec_from_file_location(
        "bench_gpu_training", Path(__file__).with_name("bench_gpu_training.py")
    )
    assert spec and spec.loader
    training_bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = training_bench
    spec.loader.exec_module(training_bench)

    from jpslm_assets.resources.generation_llama_server import LlamaServerBackend
    from jpslm_assets.resources.loaded_models import release_loaded_models

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tree = source_tree(args.llama_src, args.work)
    build = args.work / "llama-build"
    builder = start_build(tree, build, args.cuda_arch, args.jobs)
    training_bench.prepare(args.work, args.shape, 8, 0)
    f16, q4 = args.work / "model-f16.gguf", args.work / "model-q4_k_m.gguf"
    convert_s = convert(tree, args.work / "model", f16) if not q4.is_file() else 0.0
    log(f"GGUF F16 ready (convert {convert_s:.0f}s)")
    if builder is not None:
        code = builder.wait()
        if code != 0:
            raise SystemExit(f"llama.cpp build failed ({code}):\n{Path(f'{build}.log').read_text()[-4000:]}")
    build_s = time.monotonic() - started
    quantize_s = quantize(build / "bin" / "llama-quantize", f16, q4)
    log(
        f"Q4_K_M ready: {q4.stat().st_size / 1e9:.2f} GB (quantize {quantize_s:.0f}s; build done at {build_s:.0f}s)"
    )

    settings = Settings(max_new_tokens=args.max_new_tokens)
    asked = questions(args.questions)
    per_slot = 512 + args.max_new_tokens
    backend = LlamaServerBackend(
        binary=str(build / "bin" / "llama-server"), parallel=args.parallel, n_ctx=per_slot, n_gpu_layers=999
    )
    # The server starts inside the first request: this is start-up, GGUF load and one 8-token answer.
    load_s = timed(backend, q4, asked[:1], Settings(max_new_tokens=8), 1)["wall_seconds"]
    log(f"server started and answered a first 8-token request in {load_s:.1f}s")
    parallel = timed(backend, q4, asked, settings, args.parallel)
    log(f"{parallel['questions']} answers, {args.parallel} at once: {parallel['wall_seconds']:.1f}s")
    sequential = timed(backend, q4, asked[: args.sequential], settings, 1)
    log(f"{sequential['questions']} answers one at a time: {sequential['wall_seconds']:.1f}s")
    release_loaded_models()

    import torch

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gguf": {"path": str(q4), "bytes": q4.stat().st_size, "type": "Q4_K_M", "shape": args.shape},
        "setup_seconds": {"build_and_convert": round(build_s, 1), "quantize": round(quantize_s, 1)},
        "server_start_and_first_answer_seconds": round(load_s, 1),
        "parallel": parallel,
        "sequential": sequential,
        "projected_sequential_seconds_for_all": sequential["seconds_per_question"] * parallel["questions"],
        "speedup": sequential["seconds_per_question"] / parallel["seconds_per_question"],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
