"""Models loaded in this process, shared by the generation backends: a least-recently-used cache per kind
(llama.cpp models, Hugging Face models and tokenizers, running llama-server processes) and the lock each
loaded llama.cpp model is used under."""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import OrderedDict
from typing import Any

_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def exclusive(model: Any) -> threading.RLock:
    """The lock that one loaded model's users hold while they decode with it or close it.

    A llama.cpp context is not thread-safe: two threads decoding with one ``Llama`` (or one closing it while
    another decodes) crash the process. Models are shared through the cache below, so every decode and every
    close goes through this lock.
    """
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _close(model: Any) -> None:
    close = getattr(model, "close", None)
    if callable(close):
        with exclusive(model):
            close()


class LoadedModels:
    """Models loaded in this process, least recently used evicted first (each holds its weights in RAM)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, key: tuple[Any, ...], load: Any, capacity: int) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            while len(self._models) >= max(capacity, 1):
                _, evicted = self._models.popitem(last=False)
                _close(evicted)
            loaded = load()
            self._models[key] = loaded
            return loaded

    def discard(self, key: tuple[Any, ...]) -> None:
        """Forget (and close) one entry."""
        with self._lock:
            model = self._models.pop(key, None)
        if model is not None:
            _close(model)

    def clear(self) -> None:
        with self._lock:
            for model in self._models.values():
                _close(model)
            self._models.clear()


LLAMA_MODELS = LoadedModels()
HF_MODELS = LoadedModels()
HF_TOKENIZERS = LoadedModels()
LLAMA_SERVERS = LoadedModels()  # running llama-server processes; close() stops one


def release_loaded_models() -> None:
    """Free every model this process holds (between export steps that each need a lot of memory), and stop
    the llama-server processes it started."""
    for cache in (LLAMA_MODELS, HF_MODELS, HF_TOKENIZERS, LLAMA_SERVERS):
        cache.clear()


atexit.register(LLAMA_SERVERS.clear)
