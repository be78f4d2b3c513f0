"""Seconds per judgement of the demo judge (embedded llama.cpp, SmolLM2-135M GGUF) at several answer caps.

Items are built from the packaged knowledge graph: a node's description is the reference answer and
another node's description (or the same one) the candidate, so the text is real Japanese of realistic
length. Prints one line per setting and the ratio to the first, measured side by side in one run.

    python benchmarks/judge_throughput.py --items 12 --chars 200 400 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from importlib import resources

from jpslm_assets.domain import judging as judge_lib
from jpslm_assets.judging import judge_resource_for
from jpslm_assets.resources.generation import LlamaCppBackend
from jpslm_assets.resources.generation_api import GenerationRequest, GenerationResult
from jpslm_assets.settings import load_profile


def items_from_graph(count: int) -> list[judge_lib.JudgeItem]:
    text = (resources.files("jpslm_assets") / "data" / "kg" / "nodes.jsonl").read_text("utf-8")
    nodes = [json.loads(line) for line in text.splitlines() if line.strip()]
    nodes = [node for node in nodes if node.get("section") and node.get("description")]
    items = []
    for index in range(count):
        node = nodes[(index * 7) % len(nodes)]
        # Every other candidate is the right description; the rest describe another node (a wrong answer).
        candidate = node if index % 2 == 0 else nodes[(index * 7 + 3) % len(nodes)]
        items.append(
            judge_lib.JudgeItem(
                question_id=f"B{index:03d}",
                category=node.get("category"),
                question=f"{node['name']}とは何か、基準ではどのように扱われるか。",
                reference_answer=node["description"],
                location=judge_lib.node_location(node),
                answer=candidate["description"],
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
    items = items_from_graph(args.items)
    print(f"# judge throughput, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, model {os.path.basename(model_ref)}, {len(items)} judgements per row")
    first: float | None = None
    for threads in args.threads:
        backend = LlamaCppBackend(n_ctx=rubric.generation.num_ctx, n_threads=threads)
        prompt_tokens: list[int] = []

        def generate(request: GenerationRequest, backend: LlamaCppBackend = backend) -> GenerationResult:
            result = backend.generate(model_ref, request)
            prompt_tokens.append(result.prompt_tokens)
            return result

        backend.load(model_ref)  # load outside the timed loop
        for chars in args.chars:
            settings = judge.settings(rubric, max_answer_chars=chars)
            prompt_tokens.clear()
            started = time.perf_counter()
            frame = judge_lib.judge_answers(items, generate, rubric, settings)
            seconds = (time.perf_counter() - started) / len(items)
            first = first or seconds
            parse_rate = frame.get_column("parse_ok").mean()
            print(
                f"threads={threads} max_answer_chars={chars}: {seconds:.2f} s/judgement "
                f"(x{seconds / first:.2f} of the first row), {sum(prompt_tokens) / len(prompt_tokens):.0f} prompt "
                f"tokens, parse rate {parse_rate:.2f}, scores {frame.get_column('score').to_list()}"
            )


if __name__ == "__main__":
    main()
