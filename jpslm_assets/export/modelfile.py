"""Ollama Modelfiles derived from a model's own (Jinja) chat template.

Ollama templates are Go templates, HF chat templates are Jinja. Rather than translating Jinja source, the
template is *rendered* on a few sentinel conversations and the text around the sentinels gives each turn's
prefix and suffix, the text before the first turn (BOS, a default system prompt) and the generation prompt.
Those pieces are then laid out as a Go template. ``ChatTurns.render`` lays them out the same way in Python,
so tests can check the pieces reproduce the Jinja rendering exactly.

No double BOS: llama.cpp and Ollama prepend BOS themselves when the GGUF says ``add_bos_token``; a template
that also writes ``bos_token`` (Llama 3) would then start with two. The BOS text is stripped from the
Ollama template in that case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_USER_1 = "JPSLMUSERONE"
_USER_2 = "JPSLMUSERTWO"
_ASSISTANT_1 = "JPSLMASSISTANTONE"
_SYSTEM_1 = "JPSLMSYSTEMONE"


class ChatTemplateError(ValueError):
    """A chat template cannot be used for serving; the message names the model, the problem and the fix."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render an HF chat template with transformers' own renderer (what ``apply_chat_template`` runs: its sandboxed
    Jinja environment, filters and globals such as ``raise_exception`` and ``strftime_now``)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered = render_jinja_template(
            conversations=[[dict(message) for message in messages]],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )[0]  # (texts, generation indices)
    except TemplateError as exc:
        # raise_exception() inside the template raises TemplateError with the template's own message.
        raise ChatTemplateError(f"the chat template does not render the conversation: {exc}") from exc
    return str(rendered[0])


@dataclass(frozen=True)
class ChatTurns:
    """The literal text a chat template puts around each turn."""

    preamble: str  # before the first turn when there is no system message (BOS, a default system prompt)
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    system_prefix: str | None  # None: the template has no system role
    system_suffix: str | None

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """Lay out a conversation from the pieces (what the Ollama template does), for checking."""
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system and self.system_prefix is not None:
            text = f"{self.system_prefix}{system[0]}{self.system_suffix}"
        else:
            text = self.preamble
        for message in messages:
            if message["role"] == "user":
                text += f"{self.user_prefix}{message['content']}{self.user_suffix}"
            elif message["role"] == "assistant":
                text += f"{self.assistant_prefix}{message['content']}{self.assistant_suffix}"
        return text + (self.generation_prompt if add_generation_prompt else "")


def _split_around(text: str, sentinel: str, what: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ChatTemplateError(f"the chat template does not render the {what} content verbatim")
    before, after = text.split(sentinel)
    return before, after


def chat_turns(template: str, bos_token: str = "", eos_token: str = "", model: str = "model") -> ChatTurns:
    """Find each turn's prefix/suffix and the generation prompt by rendering sentinel conversations."""

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return render_chat_template(template, messages, generation, bos_token, eos_token)

    user_1 = {"role": "user", "content": _USER_1}
    assistant_1 = {"role": "assistant", "content": _ASSISTANT_1}
    user_2 = {"role": "user", "content": _USER_2}
    one_turn = render([user_1], False)
    prompted = render([user_1], True)
    if prompted == one_turn:
        raise ChatTemplateError(
            f"the chat template of {model} has no generation prompt: rendering with add_generation_prompt=True "
            "adds nothing, so the model would continue the user's turn instead of answering. Add "
            "`{% if add_generation_prompt %}<assistant header>{% endif %}` at the end of the template "
            "(tokenizer_config.json / chat_template.jinja) and re-materialize merged_model."
        )
    if not prompted.startswith(one_turn):
        raise ChatTemplateError(
            f"the chat template of {model} rewrites earlier turns when add_generation_prompt=True; "
            "it cannot be laid out as an Ollama template."
        )
    generation_prompt = prompted[len(one_turn):]
    two_turns = render([user_1, assistant_1], False)
    if not two_turns.startswith(one_turn):
        raise ChatTemplateError(f"the chat template of {model} renders earlier turns differently later on")
    assistant_prefix, assistant_suffix = _split_around(two_turns[len(one_turn):], _ASSISTANT_1, "assistant")
    three_turns = render([user_1, assistant_1, user_2], False)
    if not three_turns.startswith(two_turns):
        raise ChatTemplateError(f"the chat template of {model} renders earlier turns differently later on")
    user_prefix, user_suffix = _split_around(three_turns[len(two_turns):], _USER_2, "user")
    first_user = user_prefix + _USER_1 + user_suffix
    if not one_turn.endswith(first_user):
        raise ChatTemplateError(f"the chat template of {model} renders the first user turn unlike later ones")
    preamble = one_turn[: -len(first_user)]

    system_prefix = system_suffix = None
    try:
        with_system = render([{"role": "system", "content": _SYSTEM_1}, user_1], False)
    except ChatTemplateError:
        with_system = None  # the template rejects a system role (raise_exception)
    if with_system is not None and _SYSTEM_1 in with_system and with_system.endswith(first_user):
        system_prefix, system_suffix = _split_around(with_system[: -len(first_user)], _SYSTEM_1, "system")
    return ChatTurns(
        preamble=preamble,
        user_prefix=user_prefix,
        user_suffix=user_suffix,
        assistant_prefix=assistant_prefix,
        assistant_suffix=assistant_suffix,
        generation_prompt=generation_prompt,
        system_prefix=system_prefix,
        system_suffix=system_suffix,
    )


def without_bos(turns: ChatTurns, bos_token: str) -> ChatTurns:
    """The same turns without a leading BOS text (the server adds the BOS token itself)."""
    if not bos_token:
        return turns

    def strip(text: str | None) -> str | None:
        return text[len(bos_token):] if text is not None and text.startswith(bos_token) else text

    return ChatTurns(
        preamble=strip(turns.preamble) or "",
        user_prefix=turns.user_prefix,
        user_suffix=turns.user_suffix,
        assistant_prefix=turns.assistant_prefix,
        assistant_suffix=turns.assistant_suffix,
        generation_prompt=turns.generation_prompt,
        system_prefix=strip(turns.system_prefix),
        system_suffix=turns.system_suffix,
    )


def _go_literal(text: str) -> str:
    # Go template literal text is copied verbatim; only the action delimiters would be misread.
    if "{{" in text or "}}" in text:
        raise ChatTemplateError(f"chat template text {text!r} contains '{{{{' or '}}}}', which Go templates reserve")
    return text


def ollama_template(turns: ChatTurns) -> str:
    """The Go template Ollama renders, built from the turn pieces (no whitespace-trimming markers: the
    pieces' own newlines must survive)."""
    if turns.system_prefix is not None:
        head = (
            f"{{{{ if .System }}}}{_go_literal(turns.system_prefix)}{{{{ .System }}}}"
            f"{_go_literal(turns.system_suffix or '')}{{{{ else }}}}{_go_literal(turns.preamble)}{{{{ end }}}}"
        )
    else:
        head = _go_literal(turns.preamble)
    body = (
        '{{ range .Messages }}{{ if eq .Role "user" }}'
        f"{_go_literal(turns.user_prefix)}{{{{ .Content }}}}{_go_literal(turns.user_suffix)}"
        '{{ else if eq .Role "assistant" }}'
        f"{_go_literal(turns.assistant_prefix)}{{{{ .Content }}}}{_go_literal(turns.assistant_suffix)}"
        "{{ end }}{{ end }}"
    )
    return head + body + _go_literal(turns.generation_prompt)


def stop_sequences(turns: ChatTurns, catalogue_stops: Sequence[str], eos_token: str = "") -> list[str]:
    """Stops: the catalogue's, the end-of-turn marker the template writes, and EOS, without repeats."""
    candidates = [*catalogue_stops, turns.assistant_suffix.strip(), eos_token]
    stops: list[str] = []
    for stop in candidates:
        if stop and stop not in stops:
            stops.append(stop)
    return stops


@dataclass(frozen=True)
class ModelfileSpec:
    """Everything ``ollama create`` needs; ``render()`` gives the Modelfile text, ``parameters()`` the API's."""

    gguf_file: str
    template: str
    stop: tuple[str, ...]
    seed: int
    temperature: float
    num_ctx: int
    num_predict: int
    comment: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict[str, Any]:
        return {
            "stop": list(self.stop),
            "seed": self.seed,
            "temperature": self.temperature,
            "num_ctx": self.num_ctx,
            "num_predict": self.num_predict,
        }

    def render(self) -> str:
        if '"""' in self.template:
            raise ChatTemplateError('the Ollama template contains """, which a Modelfile cannot quote')
        lines = [f"# {self.comment}"] if self.comment else []
        lines += [f"FROM ./{self.gguf_file}", f'TEMPLATE """{self.template}"""']
        lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in self.stop]
        lines += [
            f"PARAMETER seed {self.seed}",
            f"PARAMETER temperature {self.temperature:g}",
            f"PARAMETER num_ctx {self.num_ctx}",
            f"PARAMETER num_predict {self.num_predict}",
        ]
        return "\n".join(lines) + "\n"


def build_modelfile(
    chat_template: str | None,
    gguf_file: str,
    *,
    model: str,
    bos_token: str,
    eos_token: str,
    server_adds_bos: bool,
    catalogue_stops: Sequence[str],
    seed: int,
    temperature: float,
    num_ctx: int,
    num_predict: int,
    comment: str = "",
) -> ModelfileSpec:
    """A reproducible Modelfile (fixed seed, temperature, context and length) from the model's template."""
    if not chat_template:
        raise ChatTemplateError(
            f"{model} has no chat template (tokenizer_config.json / chat_template.jinja): set one on the "
            "tokenizer before training so the exported model knows how a conversation is laid out."
        )
    turns = chat_turns(chat_template, bos_token, eos_token, model=model)
    served = without_bos(turns, bos_token) if server_adds_bos else turns
    return ModelfileSpec(
        gguf_file=gguf_file,
        template=ollama_template(served),
        stop=tuple(stop_sequences(turns, catalogue_stops, eos_token)),
        seed=seed,
        temperature=temperature,
        num_ctx=num_ctx,
        num_predict=num_predict,
        comment=comment,
    )
