"""The CPU the trainer and llama.cpp run on: whether it has fast bf16 (AVX512-BF16 / AMX), how many threads to use, and whether other processes already keep its cores busy."""

from __future__ import annotations

import os
import time

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 matmul support


def cpu_bf16_flags() -> set[str]:
    """The native-bf16 features this CPU has, from torch's CPU capability checks (AVX512-BF16, AMX),
    else from ``/proc/cpuinfo``; empty where neither can tell."""
    found: set[str] = set()
    try:
        import torch

        checks = {
            "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
            "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None),
        }
        if all(callable(check) for check in checks.values()):
            return {flag for flag, check in checks.items() if callable(check) and check()}
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    found = {flag for flag in line.split(":", 1)[1].split() if flag in CPU_BF16_FLAGS}
                    break
    except OSError:
        pass
    return found


def choose_cpu_precision(requested: str, native_bf16: set[str]) -> tuple[str, str]:
    """(``fp32`` or ``bf16``, why) for CPU training.

    ``auto`` takes bf16 autocast only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there it
    trains 1.4-1.7x faster than fp32; elsewhere (AVX2 only) a bf16 matmul is emulated and runs about 40x
    slower than fp32. An explicit ``fp32`` or ``bf16`` is kept as asked, with a warning in the reason when
    bf16 is asked for on a CPU without it.
    """
    have = ", ".join(sorted(native_bf16)) or "none"
    if requested == "fp32":
        return "fp32", f"cpu_precision=fp32 as configured (native bf16 features: {have})"
    if requested == "bf16":
        if native_bf16:
            return "bf16", f"cpu_precision=bf16 as configured; the CPU has {have}"
        return "bf16", (
            "cpu_precision=bf16 as configured, but this CPU has no AVX512-BF16 or AMX: bf16 matmuls are "
            "emulated and about 40x slower than fp32; set cpu_precision to auto or fp32"
        )
    if requested != "auto":
        raise ValueError(f"cpu_precision={requested!r} is not one of auto, fp32, bf16")
    if native_bf16:
        return "bf16", f"cpu_precision=auto: the CPU computes bf16 natively ({have}), so bf16 autocast"
    return "fp32", "cpu_precision=auto: the CPU has no AVX512-BF16 or AMX (bf16 would be emulated), so fp32"


def cpu_thread_count(requested: int | None = None) -> int:
    """Torch threads for CPU work: ``requested`` if given, else the cores not already busy.

    "Not busy" is the core count minus the load other processes put on it, rounded, at least 1. On a shared
    machine an OpenMP thread that keeps being descheduled stalls every matmul that waits for it: a LoRA step
    of tiny-llama ran 10x slower with 2 threads than with 1 at a load of 7 on 2 cores, while on an idle
    machine both cores help. The 1-minute load average also counts this process's own recent work (the
    step before, in a pipeline run in one process), so when it is high the other processes' share is
    measured over a short window and the smaller of the two is used.
    """
    if requested:
        return requested
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0]
    if round(cores - busy) >= cores:
        return cores
    elsewhere = cores_busy_elsewhere()
    if elsewhere is not None:
        busy = min(busy, elsewhere)
    return max(1, min(cores, round(cores - busy)))


def physical_core_count() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    import psutil

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or available
    return max(1, min(available, physical))


def llama_cpp_thread_count(requested: int | None = None) -> int:
    """Generation threads for llama.cpp: ``requested`` if given, else the physical cores not already busy.

    Token generation is bound by memory bandwidth and thread synchronisation: one thread per physical core is
    llama.cpp's own advice, and a thread on a busy core stalls every token (see ``cpu_thread_count``).
    llama-cpp-python's default (half the logical CPUs) assumes two hyperthreads a core; on a 2-vCPU machine
    without them it generated SmolLM2 tokens 1.6x slower than 2 threads.
    """
    if requested:
        return requested
    return max(1, min(physical_core_count(), cpu_thread_count()))


def cores_busy_elsewhere(window_s: float = 0.5) -> float | None:
    """Cores that other processes kept busy over the next ``window_s`` seconds, from ``/proc/stat``.

    This process sleeps while it measures, and whatever CPU time it used anyway is taken off. None where
    ``/proc/stat`` cannot be read (not Linux).
    """

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                # cpu user nice system idle iowait irq softirq steal (guest time is inside user already)
                ticks = [int(value) for value in handle.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(ticks), ticks[3] + ticks[4]) if len(ticks) >= 5 else None

    before, own_before, wall_before = sample(), time.process_time(), time.monotonic()
    time.sleep(window_s)
    after, own, wall = sample(), time.process_time() - own_before, time.monotonic() - wall_before
    if before is None or after is None or after[0] <= before[0] or wall <= 0:
        return None
    busy_fraction = 1.0 - (after[1] - before[1]) / (after[0] - before[0])
    return max(0.0, busy_fraction * (os.cpu_count() or 1) - own / wall)
