"""Seconds per judgement of the demo judge (embedded llama.cpp, SmolLM2-135M GGUF) at several answer caps.

Items are the packaged test set's questions with their reference answers and knowledge-graph locations;
the candidate answers are other questions' references, long enough that the answer cap decides the prompt
length. Prints one line per setting and the ratio to the first, measured side by side in one run: wall
seconds, and CPU seconds of this process, which on a machine shared with other jobs is the better estimate
of the unloaded time. ``--threads`` sets llama.cpp's generation threads; prompt processing uses
llama-cpp-python's default batch threads (one per CPU).

    python benchmarks/judge_throughput.py --items 12 --chars 200 400 --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from importlib import resources

import polars as pl

from jpslm_assets.domain import judging as judge_lib
from jpslm_assets.judging import judge_resource_for
from jpslm_assets.resources.generation import LlamaCppBackend
from jpslm_assets.resources.generation_api import GenerationRequest, GenerationResult
from jpslm_assets.settings import load_profile


def packaged(name: str) -> pl.DataFrame:
    return pl.read_ndjson(resources.files("jpslm_assets").joinpath("data", *name.split("/")).read_bytes())


def items_from_test_set(count: int) -> list[judge_lib.JudgeItem]:
    """Test questions with their references and KG locations; each candidate is another question's reference
    repeated to about 400 characters, so the answer cap is what decides the prompt length."""
    test_set = packaged("test_set_200.jsonl").filter(pl.col("human_written")).head(count)
    locations = judge_lib.question_locations(test_set, packaged("kg/nodes.jsonl"))
    rows = test_set.to_dicts()
    items = []
    for index, row in enumerate(rows):
        other = rows[(index + 1) % len(rows)]["reference_answer"]
        items.append(
            judge_lib.JudgeItem(
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
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    profile = load_profile("demo")
    judge = judge_resource_for(profile)
    rubric = judge_lib.load_rubric()
    model_ref = judge.model_ref()
    items = items_from_test_set(args.items)
    print(
        f"# judge throughput, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, model {os.path.basename(model_ref)}, "
        f"{len(items)} judgements per row"
    )
    first: float | None = None
    for threads in args.threads:
        backend = LlamaCppBackend(n_ctx=rubric.generation.num_ctx, n_threads=threads)
        prompt_tokens: list[int] = []

        def generate(
            request: GenerationRequest, backend: LlamaCppBackend = backend, tokens: list[int] = prompt_tokens
        ) -> GenerationResult:
            result = backend.generate(model_ref, request)
            tokens.append(result.prompt_tokens)
            return result

        backend.load(model_ref)  # load outside the timed loop
        for chars in args.chars:
            settings = judge.settings(rubric, max_answer_chars=chars)
            prompt_tokens.clear()
            started, cpu_started = time.perf_counter(), time.process_time()
            frame = judge_lib.judge_answers(items, generate, rubric, settings)
            seconds = (time.perf_counter() - started) / len(items)
            cpu_seconds = (time.process_time() - cpu_started) / len(items)
            first = first or seconds
            parse_rate = frame.get_column("parse_ok").mean()
            print(
                f"threads={threads} max_answer_chars={chars}: {seconds:.2f} s/judgement wall "
                f"(x{seconds / first:.2f} of the first row), {cpu_seconds:.2f} CPU s/judgement, "
                f"{sum(prompt_tokens) / len(prompt_tokens):.0f} prompt tokens, parse rate {parse_rate:.2f}, "
                f"scores {frame.get_column('score').to_list()}"
            )


if __name__ == "__main__":
    main()
