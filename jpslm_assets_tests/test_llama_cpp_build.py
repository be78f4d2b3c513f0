"""The llama.cpp build include (``data/llama_cpp_lean.cmake``): on a CPU that reports AMX, ggml is built for the
CPU's other instruction sets without AMX (its AMX kernels stopped with SIGILL on such a VM); elsewhere the build
keeps -march=native. Checked by configuring a stand-in ``llama.cpp`` project with CMake against cpuinfo files."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")

PROJECT = """
cmake_minimum_required(VERSION 3.16)
project(llama.cpp LANGUAGES NONE)
foreach(option IN ITEMS NATIVE AVX AVX2 FMA AVX512 AVX512_VNNI AVX512_BF16 AVX_VNNI AMX_TILE AMX_INT8 AMX_BF16)
  message(STATUS "GGML_${option}=${GGML_${option}}")
endforeach()
message(STATUS "LLAMA_BUILD_COMMON=${LLAMA_BUILD_COMMON}")
"""


def configure(tmp_path: Path, flags: str) -> dict[str, str]:
    (tmp_path / "CMakeLists.txt").write_text(PROJECT)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    include = resources.files("jpslm_assets") / "data" / "llama_cpp_lean.cmake"
    completed = subprocess.run(
        ["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build"), "-DCMAKE_SYSTEM_PROCESSOR=x86_64",
         f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={include}", f"-DJPSLM_CPUINFO={cpuinfo}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(re.findall(r"-- (GGML_\w+|LLAMA_BUILD_COMMON)=(\S*)", completed.stdout))


def test_a_cpu_reporting_amx_gets_its_other_instruction_sets_and_no_amx(tmp_path: Path) -> None:
    found = configure(tmp_path, "fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16")
    assert found["GGML_NATIVE"] == "OFF"
    assert all(found[f"GGML_{name}"] == "ON" for name in ("AVX", "AVX2", "FMA", "AVX512", "AVX512_VNNI", "AVX512_BF16"))
    assert found["GGML_AVX_VNNI"] == "OFF", "a flag the CPU does not report stays off"
    assert all(found[f"GGML_{name}"] == "OFF" for name in ("AMX_TILE", "AMX_INT8", "AMX_BF16"))
    assert found["LLAMA_BUILD_COMMON"] == "OFF"


def test_a_cpu_without_amx_keeps_the_native_build(tmp_path: Path) -> None:
    found = configure(tmp_path, "fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512_bf16")
    # Nothing is set: llama.cpp's own default (-march=native) applies.
    assert found["GGML_NATIVE"] == "" and found["GGML_AVX512"] == "" and found["GGML_AMX_INT8"] == ""
    assert found["LLAMA_BUILD_COMMON"] == "OFF"
