"""A local stand-in for an Ollama server, speaking the documented HTTP API bits this project uses.

Endpoints: ``GET /api/version``, ``GET /api/tags``, ``HEAD``/``POST /api/blobs/<digest>``, ``POST /api/create``
(``files`` + ``template`` + ``parameters``), ``POST /api/show``, ``DELETE /api/delete``, ``POST /api/chat`` and
``POST /api/generate`` (streaming and not). Errors come back as ``{"error": ...}`` with Ollama's status codes.

It really generates: a created model's blob is loaded with llama.cpp, its stored TEMPLATE is rendered the
way Ollama renders it (the Go-template subset a Modelfile from ``export/modelfile.py`` uses: text,
``{{ .Field }}``, ``if/else if/else``, ``eq``, ``range``), BOS is prepended when the GGUF asks for it, and the
stored parameters are overridden by request options (``num_predict``, ``seed``, ``temperature``, ``stop``,
``num_ctx``). ``format`` (a JSON schema) becomes a llama.cpp grammar.

Faults for tests: ``fail_next(status, message)`` answers the next request(s) with an error, ``delay_s`` holds
every answer back (a server that accepts and stays silent), ``chunk_delay_s`` pauses between the streamed
chunks of a reply (a slow or stalling generation), ``requests`` records what clients sent. A streamed reply
comes as one chunk per few characters, written and flushed one by one, then the final chunk.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------- Go template subset


class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


@dataclass
class _Node:
    kind: str  # text | field | if | range
    text: str = ""
    branches: list[tuple[str | None, list[_Node]]] = field(default_factory=list)  # (condition, body)
    body: list[_Node] = field(default_factory=list)


def _tokens(template: str) -> Iterator[tuple[str, str]]:
    position = 0
    pending_trim = False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if pending_trim:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        if text:
            yield "text", text
        yield "action", match.group(2)
        pending_trim = bool(match.group(3))
        position = match.end()
    tail = template[position:]
    if pending_trim:
        tail = tail.lstrip()
    if tail:
        yield "text", tail


def parse_go_template(template: str) -> list[_Node]:
    stream = list(_tokens(template))
    nodes, _, stop = _parse(stream, 0)
    if stop is not None:
        raise GoTemplateError(f"unexpected {{{{ {stop} }}}}")
    return nodes


def _parse(stream: list[tuple[str, str]], index: int) -> tuple[list[_Node], int, str | None]:
    nodes: list[_Node] = []
    while index < len(stream):
        kind, value = stream[index]
        index += 1
        if kind == "text":
            nodes.append(_Node("text", text=value))
        elif value.startswith("if "):
            node = _Node("if")
            condition: str | None = value[3:].strip()
            while True:
                body, index, stop = _parse(stream, index)
                node.branches.append((condition, body))
                if stop == "end":
                    break
                if stop == "else":
                    condition = None
                elif stop is not None and stop.startswith("else if "):
                    condition = stop[len("else if "):].strip()
                else:
                    raise GoTemplateError("unterminated {{ if }}")
            nodes.append(node)
        elif value.startswith("range "):
            body, index, stop = _parse(stream, index)
            if stop != "end":
                raise GoTemplateError("unterminated {{ range }}")
            nodes.append(_Node("range", text=value[6:].strip(), body=body))
        elif value == "end" or value == "else" or value.startswith("else if "):
            return nodes, index, value
        elif value.startswith("."):
            nodes.append(_Node("field", text=value))
        else:
            raise GoTemplateError(f"unsupported action {{{{ {value} }}}}")
    return nodes, index, None


def _lookup(name: str, scope: Mapping[str, Any]) -> Any:
    if name == ".":
        return scope
    value: Any = scope
    for part in name.lstrip(".").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _truth(condition: str, scope: Mapping[str, Any]) -> bool:
    match = re.fullmatch(r'eq\s+(\.\S*)\s+"([^"]*)"', condition)
    if match:
        return _lookup(match.group(1), scope) == match.group(2)
    if condition.startswith("."):
        return bool(_lookup(condition, scope))
    raise GoTemplateError(f"unsupported condition {condition!r}")


def render_go_template(nodes: Sequence[_Node], scope: Mapping[str, Any]) -> str:
    out = []
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "field":
            value = _lookup(node.text, scope)
            out.append("" if value is None else str(value))
        elif node.kind == "if":
            for condition, body in node.branches:
                if condition is None or _truth(condition, scope):
                    out.append(render_go_template(body, scope))
                    break
        elif node.kind == "range":
            for item in _lookup(node.text, scope) or []:
                out.append(render_go_template(node.body, item))
    return "".join(out)


# ------------------------------------------------------------------------------------------ server


@dataclass
class FakeModel:
    name: str
    blob: Path
    template: str | None
    parameters: dict[str, Any]
    digest: str
    created: str


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: Any


class FakeOllama:
    """Start with ``with FakeOllama(tmp_path) as fake:``; ``fake.url`` is the OLLAMA_HOST to use."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.blobs = self.folder / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, FakeModel] = {}
        self.requests: list[RecordedRequest] = []
        self.delay_s = 0.0
        self.chunk_delay_s = 0.0
        self.chunk_chars = 4
        self.last_prompt: str | None = None  # the text the last generation saw, after template rendering
        self._failures: list[tuple[int, str, str | None]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # Handler threads are joined on close: a request still generating (after a client timed out on it)
        # must not outlive the test that sent it.
        self._server.daemon_threads = False
        self._server.block_on_close = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeOllama:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, status: int, message: str, count: int = 1, path: str | None = None) -> None:
        """Answer the next ``count`` requests (to ``path`` only, when given) with ``{"error": message}``."""
        self._failures.extend([(status, message, path)] * count)

    def _take_failure(self, path: str) -> tuple[int, str] | None:
        with self._lock:
            for index, (status, message, only) in enumerate(self._failures):
                if only is None or only == path:
                    del self._failures[index]
                    return status, message
            return None

    # -------------------------------------------------------------------------------- behaviour

    def generate(self, model: FakeModel, prompt: str | None, messages: list[dict[str, str]] | None,
                 options: Mapping[str, Any], schema: Any) -> dict[str, Any]:
        from llama_cpp import LlamaGrammar

        from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend, complete_tokens

        settings = {**model.parameters, **(options or {})}
        backend = LlamaCppBackend(n_ctx=int(settings.get("num_ctx", 2048)))
        llama = backend.load(str(model.blob))
        if messages is not None and not model.template:
            tokens = backend.render_prompt(str(model.blob), messages)  # the GGUF's own chat template
            self.last_prompt = None
        else:
            if messages is not None:
                system = "\n".join(m["content"] for m in messages if m.get("role") == "system")
                turns = [{"Role": m.get("role"), "Content": m.get("content")} for m in messages]
                prompt = render_go_template(parse_go_template(model.template or ""), {"System": system,
                                                                                       "Messages": turns})
            self.last_prompt = prompt
            # Ollama prepends BOS itself when the GGUF asks for it.
            tokens = llama.tokenize((prompt or "").encode(), add_bos=bool(llama._model.add_bos_token()), special=True)
        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema else None
        started = time.perf_counter()
        text, generated, finish = complete_tokens(
            llama, tokens, int(settings.get("num_predict", 128)), float(settings.get("temperature", 0.8)),
            int(settings.get("seed", 0)), tuple(settings.get("stop") or ()), grammar,
        )  # fmt: skip
        elapsed = int((time.perf_counter() - started) * 1e9)
        return {
            "text": text,
            "done_reason": finish,
            "prompt_eval_count": len(tokens),
            "eval_count": generated,
            "total_duration": elapsed,
            "eval_duration": elapsed,
        }

    def model_entry(self, model: FakeModel) -> dict[str, Any]:
        return {
            "name": model.name, "model": model.name, "modified_at": model.created, "size": model.blob.stat().st_size,
            "digest": model.digest, "details": {"format": "gguf", "family": "llama", "parameter_size": "tiny",
                                                "quantization_level": "unknown"},
        }  # fmt: skip

    def modelfile_text(self, model: FakeModel) -> tuple[str, str]:
        parameters = []
        for key, value in model.parameters.items():
            for item in value if isinstance(value, list) else [value]:
                parameters.append(f"{key} {json.dumps(item) if isinstance(item, str) else item}")
        text = f"FROM {model.blob}\nTEMPLATE \"\"\"{model.template or ''}\"\"\"\n"
        text += "".join(f"PARAMETER {line}\n" for line in parameters)
        return text, "\n".join(parameters)

    # ------------------------------------------------------------------------------------ HTTP

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _stream(self, chunks: Sequence[Any]) -> None:
                """ndjson chunks written one by one; the body ends when the connection closes."""
                self.close_connection = True
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for index, item in enumerate(chunks):
                        if index and fake.chunk_delay_s:
                            time.sleep(fake.chunk_delay_s)
                        self.wfile.write(json.dumps(item).encode() + b"\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def _send(self, status: int, payload: Any = None, ndjson: Sequence[Any] | None = None) -> None:
                if ndjson is not None:
                    data = b"".join(json.dumps(item).encode() + b"\n" for item in ndjson)
                    content_type = "application/x-ndjson"
                else:
                    data = b"" if payload is None else json.dumps(payload).encode()
                    content_type = "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)

            def _error(self, status: int, message: str) -> None:
                self._send(status, {"error": message})

            def _dispatch(self) -> None:
                raw = self._body()
                body: Any = raw
                if self.path.startswith("/api/") and not self.path.startswith("/api/blobs/"):
                    try:
                        body = json.loads(raw) if raw else {}
                    except json.JSONDecodeError:
                        self._error(HTTPStatus.BAD_REQUEST, "invalid JSON body")
                        return
                fake.requests.append(RecordedRequest(self.command, self.path, body if isinstance(body, dict) else None))
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                failure = fake._take_failure(self.path.split("?")[0])
                if failure:
                    self._error(*failure)
                    return
                route = (self.command, self.path.split("?")[0])
                try:
                    if route == ("GET", "/api/version"):
                        self._send(200, {"version": "0.0.0-fake"})
                    elif route == ("GET", "/api/tags"):
                        self._send(200, {"models": [fake.model_entry(m) for m in fake.models.values()]})
                    elif self.path.startswith("/api/blobs/"):
                        self._blob(self.path.removeprefix("/api/blobs/"), raw)
                    elif route == ("POST", "/api/create"):
                        self._create(body)
                    elif route == ("POST", "/api/show"):
                        self._show(body)
                    elif route == ("DELETE", "/api/delete"):
                        if fake.models.pop(body.get("model", ""), None) is None:
                            self._error(404, f"model '{body.get('model')}' not found")
                        else:
                            self._send(200)
                    elif route in (("POST", "/api/chat"), ("POST", "/api/generate")):
                        self._generate(body, chat=route[1] == "/api/chat")
                    else:
                        self._error(404, f"404 page not found: {self.command} {self.path}")
                except Exception as exc:  # a server error, as Ollama would answer it
                    self._error(500, f"{type(exc).__name__}: {exc}")

            def _blob(self, digest: str, raw: bytes) -> None:
                path = fake.blobs / digest.replace(":", "-")
                if self.command == "HEAD":
                    self._send(200 if path.exists() else 404)
                    return
                actual = "sha256:" + hashlib.sha256(raw).hexdigest()
                if actual != digest:
                    self._error(400, f"digest mismatch, expected {digest}, got {actual}")
                    return
                path.write_bytes(raw)
                self._send(201)

            def _create(self, body: dict[str, Any]) -> None:
                name = body.get("model")
                files = body.get("files") or {}
                if not name:
                    self._error(400, "missing model name")
                    return
                if len(files) != 1:
                    self._error(400, "this server creates models from exactly one GGUF in `files`")
                    return
                (file_name, digest), = files.items()
                blob = fake.blobs / str(digest).replace(":", "-")
                if not blob.exists():
                    self._error(400, f"file {file_name}: blob {digest} not found; upload it first")
                    return
                if blob.read_bytes()[:4] != b"GGUF":
                    self._error(400, f"file {file_name} is not a GGUF model")
                    return
                if body.get("template"):
                    try:
                        parse_go_template(body["template"])
                    except GoTemplateError as exc:
                        self._error(400, f"template: {exc}")
                        return
                fake.models[name if ":" in name else f"{name}:latest"] = FakeModel(
                    name=name if ":" in name else f"{name}:latest", blob=blob, template=body.get("template"),
                    parameters=dict(body.get("parameters") or {}), digest=str(digest),
                    created=datetime.now(timezone.utc).isoformat(),
                )
                statuses = [{"status": "parsing GGUF"}, {"status": "writing manifest"}, {"status": "success"}]
                if body.get("stream", True):
                    self._send(200, ndjson=statuses)
                else:
                    self._send(200, statuses[-1])

            def _model(self, name: str) -> FakeModel | None:
                return fake.models.get(name) or fake.models.get(f"{name}:latest")

            def _show(self, body: dict[str, Any]) -> None:
                model = self._model(body.get("model", ""))
                if model is None:
                    self._error(404, f"model '{body.get('model')}' not found")
                    return
                modelfile, parameters = fake.modelfile_text(model)
                self._send(200, {
                    "modelfile": modelfile, "parameters": parameters, "template": model.template or "",
                    "details": fake.model_entry(model)["details"], "model_info": {"general.architecture": "llama"},
                    "capabilities": ["completion"], "modified_at": model.created,
                })  # fmt: skip

            def _generate(self, body: dict[str, Any], chat: bool) -> None:
                model = self._model(body.get("model", ""))
                if model is None:
                    self._error(404, f"model \"{body.get('model')}\" not found, try pulling it first")
                    return
                schema = body.get("format")
                if schema == "json":
                    schema = {"type": "object"}
                result = fake.generate(
                    model, None if chat else body.get("prompt", ""), body.get("messages") if chat else None,
                    body.get("options") or {}, schema,
                )  # fmt: skip
                final = {
                    "model": model.name, "created_at": datetime.now(timezone.utc).isoformat(), "done": True,
                    "done_reason": result["done_reason"], "total_duration": result["total_duration"],
                    "load_duration": 0, "prompt_eval_count": result["prompt_eval_count"],
                    "prompt_eval_duration": 0, "eval_count": result["eval_count"],
                    "eval_duration": result["eval_duration"],
                }  # fmt: skip
                content = {"message": {"role": "assistant", "content": result["text"]}} if chat else {
                    "response": result["text"]
                }
                if body.get("stream", True):
                    text, size = result["text"], fake.chunk_chars
                    pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
                    chunks = [
                        {"model": model.name, "created_at": final["created_at"], "done": False,
                         **({"message": {"role": "assistant", "content": piece}} if chat else {"response": piece})}
                        for piece in pieces
                    ]  # fmt: skip
                    empty = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
                    self._stream([*chunks, {**final, **empty}])
                else:
                    self._send(200, {**final, **content})

            def do_GET(self) -> None:
                self._dispatch()

            def do_POST(self) -> None:
                self._dispatch()

            def do_HEAD(self) -> None:
                self._dispatch()

            def do_DELETE(self) -> None:
                self._dispatch()

        return Handler
