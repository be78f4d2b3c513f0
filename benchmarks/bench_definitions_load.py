"""How long loading the code location takes (target < 5 s), measured in fresh interpreters.

Run: python benchmarks/bench_definitions_load.py [repeats]
"""

import statistics
import subprocess
import sys
import time


def main(repeats: int = 5) -> None:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import jpslm_assets.definitions"], check=True)
        timings.append(time.perf_counter() - started)
    baseline = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import dagster"], check=True)
        baseline.append(time.perf_counter() - started)
    load, bare = statistics.median(timings), statistics.median(baseline)
    print(f"import jpslm_assets.definitions: median {load:.2f} s over {repeats} runs (target < 5 s)")
    print(f"import dagster alone:            median {bare:.2f} s; project overhead {load - bare:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
