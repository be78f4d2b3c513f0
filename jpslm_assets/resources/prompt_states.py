"""States of a llama.cpp context after shared prompt prefixes: computed once, restored for every request.

Many requests share leading tokens: every judgement starts with the judge's role and rubric, and the
judgements of one question (every adapter, every format) also share the question, its reference and its
location, up to the candidate answer. Such a request names the token counts where its shared parts end
(``boundaries``). The context state at each boundary is computed once, always the same way: from the state at
the boundary before it (or from an empty context for the first), by evaluating the tokens in between. A request
then restores the deepest state it finds and evaluates only the rest. Because a state's computation never
depends on which request asked first, a reply never depends on the order of the requests.

States are kept by model file (path, mtime, size) and context settings, so they outlive a model evicted from
the loaded-model cache and die with a replaced file. Only llama.cpp's own state (KV cache, last logits) is
stored, not llama-cpp-python's ``save_state``, which also copies a logits array of ``n_batch x vocabulary``
floats (100 MB for a 49k vocabulary) per state. The cache holds at most ``MAX_BYTES``, least recently used
out first.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jpslm_assets.resources.llama_cpp_tools import file_identity

MAX_BYTES = 512 * 1024 * 1024

_STATES: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
_SIZE = 0
_LOCK = threading.Lock()


def _model_key(llm: Any) -> tuple[Any, ...]:
    params = llm.context_params
    return (
        file_identity(Path(llm.model_path)),
        int(params.n_ctx),
        int(params.n_batch),
        int(params.type_k),
        int(params.type_v),
        int(getattr(params, "flash_attn_type", getattr(params, "flash_attn", 0))),
    )


def _get(key: tuple[Any, ...]) -> bytes | None:
    with _LOCK:
        state = _STATES.get(key)
        if state is not None:
            _STATES.move_to_end(key)
        return state


def _put(key: tuple[Any, ...], state: bytes) -> None:
    global _SIZE
    with _LOCK:
        if key in _STATES:
            return
        _STATES[key] = state
        _SIZE += len(state)
        while _SIZE > MAX_BYTES and len(_STATES) > 1:
            _, dropped = _STATES.popitem(last=False)
            _SIZE -= len(dropped)


def clear() -> None:
    """Forget every stored state."""
    global _SIZE
    with _LOCK:
        _STATES.clear()
        _SIZE = 0


def stored() -> list[tuple[int, ...]]:
    """The token prefixes whose states are stored, oldest first (for tests and diagnostics)."""
    with _LOCK:
        return [key[1] for key in _STATES]


def _save(llm: Any) -> bytes:
    import llama_cpp

    size = llama_cpp.llama_state_get_size(llm.ctx)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_get_data(llm.ctx, buffer, size)
    return ctypes.string_at(buffer, written)


def _load(llm: Any, tokens: Sequence[int], state: bytes) -> None:
    import llama_cpp

    buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    if llama_cpp.llama_state_set_data(llm.ctx, buffer, len(state)) != len(state):
        raise RuntimeError("llama.cpp refused a stored prompt state")
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)


def restore(llm: Any, prompt: Sequence[int], boundaries: Sequence[int]) -> None:
    """Leave ``llm`` holding exactly ``prompt[:boundaries[-1]]``, from stored states where they exist.

    ``boundaries`` are increasing token counts, each below ``len(prompt)``; every boundary's state is stored
    for later requests. The caller holds the model's lock.
    """
    if not boundaries:
        llm.reset()
        return
    if list(boundaries) != sorted(set(boundaries)) or boundaries[0] <= 0 or boundaries[-1] >= len(prompt):
        raise ValueError(f"prefix boundaries {list(boundaries)} must increase within 1..{len(prompt) - 1}")
    model = _model_key(llm)
    found = -1
    for index in range(len(boundaries) - 1, -1, -1):
        state = _get((model, tuple(prompt[: boundaries[index]])))
        if state is not None:
            _load(llm, prompt[: boundaries[index]], state)
            found = index
            break
    if found < 0:
        llm.reset()
    for index in range(found + 1, len(boundaries)):
        start = boundaries[index - 1] if index > 0 else 0
        llm.eval(list(prompt[start : boundaries[index]]))
        _put((model, tuple(prompt[: boundaries[index]])), _save(llm))
