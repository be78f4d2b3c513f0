"""A local stand-in for llama.cpp's ``llama-server``, for tests of ``LlamaServerBackend`` without a GPU.

Run as ``python fake_llama_server.py -m MODEL.gguf --host H --port P -np N -c CTX -ngl L --jinja``: the flags
the backend passes, parsed strictly (an unknown flag exits with an error, as llama-server does). It serves

- ``GET /health``: 503 ``Loading model`` for the first ``FAKE_LLAMA_LOADING_S`` seconds, then 200;
- ``POST /v1/chat/completions``: a deterministic reply derived from the last user message
  (``echo:<message>``, cut to ``max_tokens`` characters; one character counts as one token, finish reason
  ``length`` when cut), after sleeping ``FAKE_LLAMA_DELAY_S`` seconds. A message containing ``FAIL`` gets
  HTTP 500 with llama-server's error shape.

Environment knobs: ``FAKE_LLAMA_STATE_DIR`` (where it writes ``argv.json``, ``requests.jsonl`` with every
request body, and ``max_in_flight`` with the most requests it held at once), ``FAKE_LLAMA_DELAY_S``,
``FAKE_LLAMA_LOADING_S``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class State:
    def __init__(self, folder: Path, delay_s: float, loading_s: float) -> None:
        self.folder = folder
        self.delay_s = delay_s
        self.ready_at = time.monotonic() + loading_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def enter(self, body: dict[str, Any]) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            with (self.folder / "requests.jsonl").open("a", encoding="utf-8") as log:
                log.write(json.dumps(body, ensure_ascii=False) + "\n")
            partial = self.folder / "max_in_flight.partial"
            partial.write_text(str(self.max_in_flight), encoding="utf-8")
            os.replace(partial, self.folder / "max_in_flight")

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"request: {format % args}\n")

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path != "/health":
                self._send(
                    404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
                )
            elif time.monotonic() < state.ready_at:
                self._send(
                    503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
                )
            else:
                self._send(200, {"status": "ok"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path != "/v1/chat/completions":
                self._send(
                    404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
                )
                return
            state.enter(body)
            try:
                time.sleep(state.delay_s)
                user = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
                message = user[-1] if user else ""
                if "FAIL" in message:
                    self._send(
                        500, {"error": {"code": 500, "message": "fake failure", "type": "server_error"}}
                    )
                    return
                full = f"echo:{message}"
                limit = int(body.get("max_tokens") or len(full))
                text = full[:limit]
                prompt_tokens = sum(len(m.get("content", "")) for m in body.get("messages", []))
                self._send(200, {
                    "object": "chat.completion",
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length" if len(full) > limit else "stop",
                    }],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text),
                              "total_tokens": prompt_tokens + len(text)},
                    "timings": {"predicted_n": len(text)},
                })  # fmt: skip
            finally:
                state.leave()

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llama-server")
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("-np", "--parallel", type=int, default=1)
    parser.add_argument("-c", "--ctx-size", type=int, default=4096)
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    parser.add_argument("--jinja", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(os.environ.get("FAKE_LLAMA_STATE_DIR") or ".")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "argv.json").write_text(json.dumps(sys.argv[1:] if argv is None else argv), encoding="utf-8")
    if not Path(args.model).is_file():
        sys.stderr.write(f"error: failed to load model '{args.model}'\n")
        raise SystemExit(1)
    state = State(
        folder,
        float(os.environ.get("FAKE_LLAMA_DELAY_S") or 0.05),
        float(os.environ.get("FAKE_LLAMA_LOADING_S") or 0),
    )
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    sys.stderr.write(
        f"main: server is listening on http://{args.host}:{args.port} with {args.parallel} slots\n"
    )
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
