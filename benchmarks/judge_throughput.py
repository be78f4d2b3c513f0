"""Seconds per judgement of the demo judge (embedded llama.cpp, SmolLM2-135M GGUF) at several answer caps.

Items are the packaged test set's questions with their reference answers and knowledge-graph locations;
the candidate answers are other questions' references, long enough that the answer cap decides the prompt
length. Prints one line per setting and the ratio to the first, measured side by side in one run: wall
seconds, and CPU seconds of this process, which on a machine shared with other jobs is the better estimate
of the unloaded time. ``--threads`` sets llama.cpp's generation threads; prompt processing uses
llama-cpp-python's default batch threads (one per CPU).

    python benchmarks/judge_throughput.py --items 12 --chars 200 400 --weights source f16 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources

import polars as pl
from bench_readme_command import cpu_facts  # this folder is on sys.path when run as a script

from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.judging import rubric as rubric_lib
from jpslm_assets.judging import scoring as judge_lib
from jpslm_assets.judging.assets import judge_resource_for
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.settings import load_profile


def packaged(name: str) -> pl.DataFrame:
    return pl.read_ndjson(resources.files("jpslm_assets").joinpath("data", *name.split("/")).read_bytes())


def items_from_test_set(count: int) -> list[rubric_lib.JudgeItem]:
    """Test questions with their references and KG locations; each candidate is another question's reference
    repeated to about 400 characters, so the answer cap is what decides the prompt length."""
    test_set = packaged("test_set_200.jsonl").filter(pl.col("human_written")).head(count)
    locations = judge_lib.question_locations(test_set, packaged("kg/nodes.jsonl"))
    rows = test_set.to_dicts()
    items = []
    for index, row in enumerate(rows):
        other = rows[(index + 1) % len(rows)]["reference_answer"]
        items.append(
            rubric_lib.JudgeItem(
                question_id=row["question_id"],
                category=row["category"],
                question=row["question"],
                reference_answer=row["reference_answer"],
                location=locations[row["question_id"]],
                answer=(other * 4)[:400],
            )
        )
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--chars", type=int, nargs="+", default=[200, 400])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--weights", nargs="+", default=["source", "f16"], help="source | f16 | q8_0")
    parser.add_argument(
        "--grammar", nargs="+", default=["fast"], help="fast (check the chosen token) | full (mask the vocabulary)"
    )
    args = parser.parse_args()

    profile = load_profile("demo")
    rubric = rubric_lib.load_rubric()
    items = items_from_test_set(args.items)
    base = judge_resource_for(profile)
    print(
        f"# judge throughput, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {len(items)} judgements per row"
    )
    # Every (weights, threads, cap) setting judges item 1, then every setting item 2, and so on: on a machine
    # shared with other jobs the settings then see the same load, so their ratios stay meaningful.
    runs = []
    for weights in args.weights:
        judge = base.model_copy(update={"embedded_weights": weights})
        model_ref = judge.model_ref()
        for threads in args.threads:
            for grammar in args.grammar:
                backend = LlamaCppBackend(
                    n_ctx=rubric.generation.num_ctx, n_threads=threads, grammar_fast_path=grammar == "fast"
                )
                backend.load(model_ref)  # load outside the timed loop
                for chars in args.chars:
                    settings = judge.settings(rubric, max_answer_chars=chars)
                    runs.append(Run(weights, threads, grammar, chars, backend, model_ref, settings))
    for item in items:
        for run in runs:
            run.judge(item, rubric)
    first = runs[0].wall / len(items)
    for run in runs:
        wall, cpu = run.wall / len(items), run.cpu / len(items)
        print(
            f"weights={run.weights} threads={run.threads} grammar={run.grammar} max_answer_chars={run.chars}: "
            f"{wall:.2f} s/judgement "
            f"wall (x{wall / first:.2f} of the first row), {cpu:.2f} CPU s, "
            f"{sum(run.prompt_tokens) / len(run.prompt_tokens):.0f} prompt + "
            f"{sum(run.reply_tokens) / len(run.reply_tokens):.0f} reply tokens per call, "
            f"parse rate {sum(run.parsed) / len(run.parsed):.2f}, scores {run.scores}"
        )
    print(f"# {cpu_facts()}")


@dataclass
class Run:
    weights: str
    threads: int
    grammar: str
    chars: int
    backend: LlamaCppBackend
    model_ref: str
    settings: rubric_lib.JudgeSettings
    wall: float = 0.0
    cpu: float = 0.0
    prompt_tokens: list[int] = field(default_factory=list)
    reply_tokens: list[int] = field(default_factory=list)
    parsed: list[bool] = field(default_factory=list)
    scores: list[int | None] = field(default_factory=list)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        result = self.backend.generate(self.model_ref, request)
        self.prompt_tokens.append(result.prompt_tokens)
        self.reply_tokens.append(result.completion_tokens)
        return result

    def judge(self, item: rubric_lib.JudgeItem, rubric: rubric_lib.Rubric) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        verdict = judge_lib.judge_one(item, self.generate, rubric, self.settings)
        self.wall += time.perf_counter() - started
        self.cpu += time.process_time() - cpu_started
        self.parsed.append(verdict.parse_ok)
        self.scores.append(verdict.score)


if __name__ == "__main__":
    main()
