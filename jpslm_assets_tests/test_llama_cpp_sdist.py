"""Fetching the llama-cpp-python sdist (the converter's source) from a package index's JSON simple API, served
here by a local HTTP server: the right file, its sha256 checked, errors that name the index."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jpslm_assets.resources.llama_cpp_tools import LlamaCppToolError, fetch_sdist_from_index, pip_index_url


def _sdist_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = b"print('converter')\n"
        info = tarfile.TarInfo("llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _Index:
    def __init__(self) -> None:
        self.sdist = _sdist_bytes()
        self.listed_sha256 = hashlib.sha256(self.sdist).hexdigest()
        self.json_api = True
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/simple/llama-cpp-python/":
                    files = [
                        {"filename": "llama_cpp_python-0.3.35.tar.gz", "url": "/files/old.tar.gz", "hashes": {}},
                        {"filename": "llama_cpp_python-0.3.36.tar.gz", "url": "../../files/new.tar.gz",
                         "hashes": {"sha256": index.listed_sha256}},
                    ]  # fmt: skip
                    body = json.dumps({"name": "llama-cpp-python", "files": files}).encode()
                    kind = "application/vnd.pypi.simple.v1+json" if index.json_api else "text/html"
                elif self.path == "/files/new.tar.gz":
                    body, kind = index.sdist, "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"


@pytest.fixture
def index() -> Iterator[_Index]:
    served = _Index()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


def test_the_sdist_comes_from_the_index_with_its_hash_checked(index: _Index, tmp_path: Path) -> None:
    path = fetch_sdist_from_index("llama-cpp-python", "0.3.36", tmp_path, index_url=index.url)
    assert path.name == "llama_cpp_python-0.3.36.tar.gz" and path.read_bytes() == index.sdist


def test_a_hash_mismatch_is_refused_and_leaves_no_file(index: _Index, tmp_path: Path) -> None:
    index.listed_sha256 = "0" * 64
    with pytest.raises(LlamaCppToolError, match="has sha256 .* the index says 0000"):
        fetch_sdist_from_index("llama-cpp-python", "0.3.36", tmp_path, index_url=index.url)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_version_or_an_index_without_the_json_api_is_named(index: _Index, tmp_path: Path) -> None:
    with pytest.raises(LlamaCppToolError, match=r"lists no llama_cpp_python-9\.9\.9\.tar\.gz"):
        fetch_sdist_from_index("llama-cpp-python", "9.9.9", tmp_path, index_url=index.url)
    index.json_api = False
    with pytest.raises(LlamaCppToolError, match="does not offer the JSON simple API"):
        fetch_sdist_from_index("llama-cpp-python", "0.3.36", tmp_path, index_url=index.url)
    with pytest.raises(LlamaCppToolError, match=r"could not fetch .* from http://127\.0\.0\.1:9/simple"):
        fetch_sdist_from_index("llama-cpp-python", "0.3.36", tmp_path, index_url="http://127.0.0.1:9/simple")


def test_the_index_follows_pip_index_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert pip_index_url() == "https://mirror.example/simple"
