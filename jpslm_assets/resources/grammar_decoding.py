"""Greedy decoding under a GBNF grammar with llama.cpp, checking the grammar on the chosen token first.

llama-cpp-python puts the grammar into its sampler chain, where it runs over the whole vocabulary before every
token: for SmolLM2's 49,152 tokens that costs about as much as the decode itself on a 2-core CPU. llama.cpp's
own sampler (``common_sampler_sample``) avoids it: it takes the unconstrained choice, asks the grammar about
that one token, and only when the grammar rejects it runs the grammar over the whole vocabulary and chooses
again. For greedy decoding the result is the same token either way: the highest logit overall, when the
grammar allows it, is also the highest among the allowed ones (ties resolved to the lowest id in both cases).

Used by the judge (grammar-constrained JSON replies at temperature 0); imports llama_cpp and numpy lazily.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from typing import Any


class GrammarSampler:
    """One llama.cpp grammar sampler over ``llm``'s vocabulary (parsed from GBNF ``text``, rule ``root``)."""

    def __init__(self, llm: Any, text: str, root: str) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.sampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, text.encode("utf-8"), root.encode("utf-8")
        )
        if not self.sampler:
            raise ValueError("llama.cpp rejected the GBNF grammar")
        self.n_vocab = int(llm.n_vocab())
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._all: Any = None

    def allows(self, token: int) -> bool:
        """Whether the grammar, in its current state, accepts ``token`` next."""
        self._one[0] = self._llama_cpp.llama_token_data(token, 0.0, 0.0)
        self._one_array.size = 1
        self._one_array.selected = -1
        self._llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(self._one_array))
        return self._one[0].logit != float("-inf")

    def best_allowed(self, logits: Any) -> int:
        """The allowed token with the highest logit (the lowest id among equals)."""
        import numpy as np

        if self._all is None:
            self._all = np.zeros(
                self.n_vocab,
                dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True),
            )
        self._all["id"] = np.arange(self.n_vocab, dtype=np.intc)
        self._all["logit"] = logits
        self._all["p"] = 0.0
        array = self._llama_cpp.llama_token_data_array(
            data=self._all.ctypes.data_as(self._llama_cpp.llama_token_data_p),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )
        self._llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(array))
        # The grammar sampler masks rejected tokens with -inf and keeps the array's order and size.
        masked = self._all["logit"][: array.size]
        best = int(np.argmax(masked))
        if masked[best] == -np.inf:
            raise RuntimeError("the grammar allows no token here (it cannot be completed)")
        return int(self._all["id"][best])

    def accept(self, token: int) -> None:
        self._llama_cpp.llama_sampler_accept(self.sampler, token)

    def close(self) -> None:
        if self.sampler:
            self._llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None


def greedy_tokens(llm: Any, pending: Sequence[int], grammar: GrammarSampler) -> Iterator[int]:
    """Evaluate ``pending`` (the prompt tokens not yet in ``llm``'s context) and yield greedy tokens that
    ``grammar`` allows, each fed back before the next is chosen. The caller stops the iteration (end of
    generation, a stop string, the token limit)."""
    import llama_cpp
    import numpy as np

    llm.eval(list(pending))
    while True:
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(grammar.n_vocab,))
        token = int(np.argmax(logits))
        if not grammar.allows(token):
            token = grammar.best_allowed(logits)
        grammar.accept(token)
        yield token
        llm.eval([token])
