"""Time the README's demo command as a newcomer runs it: a fresh clone, a new virtual environment, pip's cache
off, the command exactly as the README gives it, then the same `jpslm demo` again unchanged.

Prints (and writes as JSON) the install and demo times, the unchanged re-run, the demo's time per stage from
its own step log, and the machine: CPU model, the flags that decide CPU training precision (AVX2, AVX512F,
AVX512-BF16, AMX) and the core count. Run it on an otherwise idle machine:

    python benchmarks/bench_readme_command.py --work /tmp/readme-bench

The clone is of the committed HEAD of this repository (uncommitted changes are not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

# Which stage each demo step belongs to, by asset name (checks count with their asset).
STAGES = [
    ("graph, QA, test set, base models", re.compile(r"^(kg_|qa_|rebalanced_pool|test_set|rubric|figure_relation|"
                                                     r"figure_qa|base_model|model_architecture|qa)")),
    ("stage 1: reference model over n", re.compile(r"^(training_subset|stage1_|figure_subset)")),
    ("n* and scale curve", re.compile(r"^(optimal_scale|figure_nll)")),
    ("stage 2: every model at n*", re.compile(r"^(stage2_|figure_loss)")),
    ("stage 3: merge and GGUF export", re.compile(r"^(merged_model|gguf_)")),
    ("stage 3: deployment and answers", re.compile(r"^(deployment|answers_|citation_)")),
    ("stage 3: judging", re.compile(r"^judge_")),
]
STEP = re.compile(r' - STEP_SUCCESS - Finished execution of step "([^"]+)" in ([0-9.]+)(ms|s|m)?(?:([0-9.]+)s)?')


def cpu_facts() -> dict[str, object]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    model = re.search(r"^model name\s*:(.*)$", text, re.M)
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in FLAGS},
        "python": platform.python_version(),
    }


def readme_demo_command() -> str:
    """The first bash block after the README's 'Run the whole demo end to end'."""
    readme = (ROOT / "README.md").read_text("utf-8")
    after = readme.split("Run the whole demo end to end", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", after, re.S).group(1).strip()


def step_seconds(log: str) -> dict[str, float]:
    """Seconds per stage from the demo's step log lines."""
    totals: dict[str, float] = defaultdict(float)
    for match in STEP.finditer(log):
        name, value, unit, extra = match.groups()
        seconds = float(value) / 1000 if unit == "ms" else float(value) * 60 + float(extra or 0) if unit == "m" \
            else float(value)
        stage = next((label for label, pattern in STAGES if pattern.match(name)), "tables, marts, figures, report")
        totals[stage] += seconds
    return dict(totals)


def run(command: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[float, int, str]:
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.call(["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return time.monotonic() - started, code, log.read_text(errors="replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="empty folder for the clone and the venv")
    parser.add_argument("--python", default=sys.executable, help="interpreter that creates the venv")
    args = parser.parse_args()
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    clone = work / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    subprocess.run([args.python, "-m", "venv", str(work / "venv")], check=True)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("JPSLM_", "DAGSTER_", "VIRTUAL_ENV"))}  # fmt: skip
    env.update(PATH=f"{work / 'venv' / 'bin'}:{env['PATH']}", PIP_NO_CACHE_DIR="1", VIRTUAL_ENV=str(work / "venv"))

    command = readme_demo_command()
    total, code, log = run(command, clone, env, work / "readme-command.log")
    demo_match = re.search(r"demo finished in (\d+) s \((\d+) runs launched\)", log)
    if code != 0 or not demo_match:
        print(log[-3000:])
        print(f"the README command failed (exit {code})")
        return 1
    install_end = log.find("Successfully installed")
    rerun, rerun_code, rerun_log = run("jpslm demo", clone, env, work / "rerun.log")
    rerun_match = re.search(r"demo finished in (\d+) s \((\d+) runs launched\)", rerun_log)
    demo_s = float(demo_match.group(1))
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": cpu_facts(),
        "command": command,
        "total_s": round(total, 1),
        "demo_s": demo_s,
        "install_and_startup_s": round(total - demo_s, 1),
        "install_log_found": install_end >= 0,
        "demo_runs": int(demo_match.group(2)),
        "stages_s": {stage: round(seconds, 1) for stage, seconds in step_seconds(log).items()},
        "rerun_wall_s": round(rerun, 1),
        "rerun_runs": int(rerun_match.group(2)) if rerun_match else None,
        "rerun_exit": rerun_code,
    }
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
