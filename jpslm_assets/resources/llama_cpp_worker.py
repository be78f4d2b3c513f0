"""The isolated side of ``llama_cpp_tools``: llama.cpp's converter and quantizer, one call per child process.

    python -m jpslm_assets.resources.llama_cpp_worker quantize SRC DST QUANT THREADS
    python -m jpslm_assets.resources.llama_cpp_worker convert CONVERTER_DIR OVERRIDES_JSON ARGS...

Only the standard library is imported at load (llama_cpp, and the converter with torch and transformers, inside
the calls), so a conversion started as a new interpreter costs the converter's own imports and no more.
``run_forked`` runs a call in a forked child instead: the child starts with everything the step has imported
already (torch and transformers take 5-10 s to import on a 2-core machine, longer than converting a small
model), and a crash or abort in it still fails only the call.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# llama.cpp ftype names for the quantizations ``LlamaCppTools.quantize`` accepts.
_FTYPE_CONSTANTS: dict[str, str] = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def _quantize_in_this_process(source: str, target: str, quant: str, threads: int) -> int:
    import ctypes

    import llama_cpp

    if quant not in _FTYPE_CONSTANTS:
        print(f"unknown quantization {quant!r}; choose one of {sorted(_FTYPE_CONSTANTS)}", file=sys.stderr)
        return 2
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPE_CONSTANTS[quant])
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if status != 0:
        print(f"llama_model_quantize returned {status}", file=sys.stderr)
    return int(status)


def convert(converter: str, overrides: dict[str, Any], arguments: list[str]) -> None:
    """Run convert_hf_to_gguf.py in this process, writing ``overrides`` into the GGUF header.

    The converter is llama.cpp's, unchanged; only its writer is told to set the given keys just before it
    writes the header (a repeated key overwrites the converter's value). Its own gguf-py is imported, never
    PyPI's ``gguf`` (in a forked child any ``gguf`` the parent imported is dropped first).
    """
    import runpy

    for name in [name for name in sys.modules if name == "gguf" or name.startswith("gguf.")]:
        del sys.modules[name]
    os.environ.pop("NO_LOCAL_GGUF", None)
    sys.path[:0] = [str(Path(converter) / "gguf-py"), converter]
    import gguf

    if overrides:
        original = gguf.GGUFWriter.write_header_to_file

        def write_header_with_overrides(self: Any, *args: Any, **kwargs: Any) -> Any:
            for key, value in overrides.items():
                if isinstance(value, bool):
                    self.add_bool(key, value)
                elif isinstance(value, int):
                    self.add_int32(key, value)
                else:
                    self.add_string(key, str(value))
            return original(self, *args, **kwargs)

        gguf.GGUFWriter.write_header_to_file = write_header_with_overrides  # type: ignore[method-assign]
    sys.argv = [str(Path(converter) / "convert_hf_to_gguf.py"), *arguments]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run_forked(call: Callable[[], int | None], log_path: Path, timeout_s: float) -> int | None:
    """Run ``call`` in a forked child with stdout and stderr in ``log_path``; its exit code (negative: the
    signal that ended it), or None when it ran past ``timeout_s`` and was killed.

    The child leaves with ``os._exit``: nothing of the parent's (exit handlers, open stores, Dagster's log
    capture) runs or flushes twice. Its logging starts afresh on its own stderr, and torch in it computes on
    one thread (an OpenMP pool does not survive a fork).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(descriptor, 1)
            os.dup2(descriptor, 2)
            os.close(descriptor)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (left to os._exit)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            for handler in list(logging.root.handlers):
                logging.root.removeHandler(handler)
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(1)
            code = call() or 0
        except SystemExit as exc:
            if isinstance(exc.code, int):
                code = exc.code
            elif exc.code is not None:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


if __name__ == "__main__":  # the subprocesses of LlamaCppTools.quantize / convert_hf_to_gguf
    if len(sys.argv) == 6 and sys.argv[1] == "quantize":
        sys.exit(_quantize_in_this_process(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    if len(sys.argv) > 4 and sys.argv[1] == "convert":
        convert(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:])
        sys.exit(0)
    print("usage: python -m jpslm_assets.resources.llama_cpp_worker quantize SRC DST QUANT THREADS")
    print("       python -m jpslm_assets.resources.llama_cpp_worker convert CONVERTER_DIR OVERRIDES_JSON ARGS...")
    sys.exit(2)
