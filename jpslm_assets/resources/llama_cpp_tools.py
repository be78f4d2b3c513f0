"""llama.cpp's own export tools: ``convert_hf_to_gguf.py`` and quantization.

Why the sdist: llama-cpp-python's wheel ships the llama.cpp library but not its Python converter. The sdist of
the *installed* version vendors the matching ``convert_hf_to_gguf.py`` together with its own ``gguf-py``,
which must be used instead of PyPI's ``gguf`` (the two drift apart). The sdist is fetched once, straight from
the package index pip is configured with (its JSON simple API, sha256 checked), with ``pip download`` as the
fallback, and only the Python parts are unpacked into a cache folder. Why not ``pip download`` first: it
prepares the sdist's metadata in an isolated build environment (scikit-build-core, CMake), about a minute and a
half on 2 cores, for a file that is only unpacked.

Conversion runs in a forked child of the step (or a new interpreter), quantization in a new interpreter, both
through ``llama_cpp_worker``: a converter crash or a llama.cpp abort then fails one step with its log instead
of killing the step process, and a killed step leaves only a ``*.partial`` file behind, never a torn file under
the final name.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from jpslm_assets import settings

LLAMA_CPP_DIST = "llama-cpp-python"
GGUF_MAGIC = b"GGUF"

# Output types accepted by convert_hf_to_gguf.py --outtype, and llama.cpp ftype names for quantization.
ConvertOutType = Literal["f16", "bf16", "f32", "q8_0"]
QuantizeType = Literal["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0"]

# The subprocesses' entry point: a module that imports nothing of the product's at load, so that a conversion
# or quantization does not pay for importing Dagster first.
WORKER = "jpslm_assets.resources.llama_cpp_worker"

# Parts of the sdist the converter needs: the script, its `conversion` package, its gguf-py, chat templates.
_SDIST_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")

FailureKind = Literal["unknown_tokenizer", "unsupported_architecture", "missing_files", "converter_error"]


class LlamaCppToolError(RuntimeError):
    """Fetching, converting or quantizing failed; the message names the file, the cause and the fix."""


class ConversionFailed(LlamaCppToolError):
    """The converter refused the model (tokenizer or architecture it does not know)."""

    def __init__(self, message: str, kind: FailureKind, log_tail: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.log_tail = log_tail


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    seconds: float
    log_tail: str


def installed_llama_cpp_version() -> str:
    """The installed llama-cpp-python version (the converter must come from the same release)."""
    try:
        return metadata.version(LLAMA_CPP_DIST)
    except metadata.PackageNotFoundError as exc:
        raise LlamaCppToolError(
            f"{LLAMA_CPP_DIST} is not installed; `pip install {LLAMA_CPP_DIST}` (it builds llama.cpp from source)."
        ) from exc


def check_gguf_file(path: Path) -> None:
    """Raise a clear error when ``path`` is missing, empty or not a GGUF file (checked by its magic bytes)."""
    path = Path(path)
    if not path.is_file():
        raise LlamaCppToolError(
            f"GGUF file {path} does not exist; materialize the gguf asset for this model and n first."
        )
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        raise LlamaCppToolError(
            f"{path} is not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r}): it is corrupt or "
            "truncated. Delete it and re-materialize the gguf asset."
        )


@dataclass(frozen=True)
class GgufChatMetadata:
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool  # whether llama.cpp (and Ollama) prepend BOS to a prompt


@dataclass(frozen=True)
class _GgufHeader:
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, ggml type, shape)
    chat: GgufChatMetadata


@functools.lru_cache(maxsize=16)
def _read_header(path: str, mtime_ns: int, size: int) -> _GgufHeader:
    """One parse of a GGUF's header and tensor table, kept per file version (path, mtime, size).

    gguf-py's reader parses every metadata array element by element (a 49k-token vocabulary takes seconds),
    and export, deployment and serving each ask for a part of the same header.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise LlamaCppToolError(f"cannot read the tensor table of {path} ({exc}); re-materialize it.") from exc
    fields = reader.fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    def token_text(key: str) -> str:
        token = value(key)
        return str(fields["tokenizer.ggml.tokens"].contents(int(token))) if token is not None else ""

    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, others do not
        add_bos = value("tokenizer.ggml.model") == "llama"
    chat = GgufChatMetadata(
        chat_template=value("tokenizer.chat_template"),
        bos_token=token_text("tokenizer.ggml.bos_token_id"),
        eos_token=token_text("tokenizer.ggml.eos_token_id"),
        add_bos=bool(add_bos),
    )
    tensors = tuple(
        (tensor.name, tensor.tensor_type.name, tuple(int(size) for size in tensor.shape)) for tensor in reader.tensors
    )
    return _GgufHeader(tensors, chat)


def file_identity(path: Path) -> tuple[str, int, int]:
    """(resolved path, mtime in ns, size): a file version, for caches that must see a replaced file."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _header(path: Path) -> _GgufHeader:
    check_gguf_file(path)
    return _read_header(*file_identity(path))


def tensor_type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type (F16, Q4_K, Q6_K, ...) a GGUF file holds."""
    counts = Counter(kind for _, kind, _ in _header(path).tensors)
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class GgufSummary:
    tensor_types: dict[str, int]
    tensors: int
    kquant_compatible: bool  # every 2-D tensor's rows are a multiple of 256 (llama.cpp's K-quant block)
    incompatible_tensors: tuple[str, ...]


def gguf_summary(path: Path) -> GgufSummary:
    """Tensor type counts and whether K-quants can apply to every matrix."""
    tensors = _header(path).tensors
    incompatible = tuple(name for name, _, shape in tensors if len(shape) >= 2 and shape[0] % 256 != 0)
    return GgufSummary(tensor_type_counts(path), len(tensors), not incompatible, incompatible)


def gguf_chat_metadata(path: Path) -> GgufChatMetadata:
    """The chat template and BOS/EOS facts from a GGUF header, without loading its weights."""
    return _header(path).chat


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete temporary files a killed export left next to ``target``; returns what was removed."""
    removed = []
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def replace_atomically(source: Path, target: Path) -> None:
    """Move a finished file or folder into place; an existing target is swapped out, then removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.replace(target, backup)
        os.replace(source, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(source, target)


def partial_path(target: Path) -> Path:
    """A unique temporary sibling of ``target`` (same folder, so the final rename is atomic)."""
    return target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")


def classify_conversion_failure(log: str) -> FailureKind:
    """Map the converter's log to why it refused (the paper's Tanuki case is an unknown tokenizer)."""
    lowered = log.lower()
    tokenizer_markers = ("pre-tokenizer was not recognized", "tokenizer.model", "vocab", "tokenizer")
    if any(marker in lowered for marker in tokenizer_markers[:1]) or (
        "error" in lowered and any(f"{marker}" in _failure_line(log).lower() for marker in tokenizer_markers)
    ):
        return "unknown_tokenizer"
    # "Architecture 'X' not supported!" (older converters), "Model X is not supported" (0.3.3x's)
    unsupported = r"architecture .* not supported|model \S+ is not supported|failed to detect model architecture"
    if re.search(unsupported, lowered):
        return "unsupported_architecture"
    if "filenotfounderror" in lowered or "missing or incomplete model files" in lowered:
        return "missing_files"
    return "converter_error"


def _failure_line(log: str) -> str:
    """The most telling line of a converter log (the exception, or the last error)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line) or line.startswith("ERROR"):
            return line
    return lines[-1] if lines else "no output"


class LlamaCppTools(dg.ConfigurableResource):
    """llama.cpp's converter (from the llama-cpp-python sdist, cached) and quantizer."""

    cache_dir: str | None = Field(
        default=None, description="Where the unpacked converter is cached; default <data dir>/cache/llama_cpp"
    )
    sdist_path: str | None = Field(
        default=None,
        description="A llama-cpp-python sdist (.tar.gz) to use instead of `pip download` (offline machines)",
    )
    convert_timeout_s: float = Field(default=4 * 3600, gt=0)
    isolation: Literal["fork", "subprocess"] = Field(
        default="fork" if sys.platform == "linux" else "subprocess",
        description="How the converter is isolated: a forked child of the step (inherits its imports; Linux) or a "
        "new interpreter (anywhere; pays the converter's imports of torch and transformers every time)",
    )
    quantize_timeout_s: float = Field(default=4 * 3600, gt=0)
    quantize_threads: int = Field(default=0, ge=0, description="0: llama.cpp picks (all cores)")

    def _cache_root(self) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else settings.data_dir() / "cache" / "llama_cpp"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def converter_dir(self) -> Path:
        """The unpacked ``vendor/llama.cpp`` of the installed llama-cpp-python version (fetched once)."""
        version = installed_llama_cpp_version()
        target = self._cache_root() / f"llama-cpp-python-{version}"
        if (target / ".complete").is_file():
            return target
        from filelock import FileLock

        # Parallel steps share the cache: one fetches, the others wait and reuse it.
        with FileLock(str(target) + ".lock", timeout=1800):
            if (target / ".complete").is_file():
                return target
            with tempfile.TemporaryDirectory(dir=self._cache_root()) as scratch:
                sdist = Path(self.sdist_path) if self.sdist_path else self._download_sdist(version, Path(scratch))
                unpacked = Path(scratch) / "unpacked"
                _unpack_converter(sdist, unpacked)
                (unpacked / ".complete").write_text(f"{LLAMA_CPP_DIST}=={version}\n", encoding="utf-8")
                if target.exists():
                    shutil.rmtree(target)
                os.replace(unpacked, target)
        return target

    def _download_sdist(self, version: str, folder: Path) -> Path:
        try:
            return fetch_sdist_from_index(LLAMA_CPP_DIST, version, folder)
        except LlamaCppToolError as exc:
            dg.get_dagster_logger().info(f"{exc}; falling back to `pip download`")
        command = [
            sys.executable, "-m", "pip", "download", f"{LLAMA_CPP_DIST}=={version}",
            "--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(folder),
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
        if completed.returncode != 0 or not found:
            raise LlamaCppToolError(
                f"could not fetch the {LLAMA_CPP_DIST}=={version} sdist with pip (exit {completed.returncode}): "
                f"{_failure_line(completed.stderr or completed.stdout)}. Give the resource `sdist_path` "
                "(a downloaded llama_cpp_python-*.tar.gz) on machines without PyPI access."
            )
        return found[0]

    def convert_hf_to_gguf(
        self,
        model_dir: Path,
        out_path: Path,
        outtype: ConvertOutType = "f16",
        metadata_overrides: Mapping[str, bool | int | str] | None = None,
    ) -> ConversionResult:
        """Run llama.cpp's converter on an HF folder; the GGUF appears at ``out_path`` only when complete.

        ``metadata_overrides`` are GGUF key/values written over what the converter decides (e.g.
        ``tokenizer.ggml.add_space_prefix``, which the converter sets for some architectures only).
        """
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise LlamaCppToolError(
                f"{model_dir} is not a Hugging Face model folder (no config.json); materialize merged_model first."
            )
        converter = self.converter_dir()
        partial = partial_path(out_path)
        arguments = [str(model_dir), "--outfile", str(partial), "--outtype", outtype]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        if self.isolation == "fork":
            code, log = self._convert_forked(converter, dict(metadata_overrides or {}), arguments)
        else:
            code, log = self._convert_in_subprocess(converter, dict(metadata_overrides or {}), arguments)
        if code is None:
            partial.unlink(missing_ok=True)
            raise LlamaCppToolError(
                f"convert_hf_to_gguf.py on {model_dir} ran past convert_timeout_s={self.convert_timeout_s:.0f}"
            )
        tail = "\n".join(log.splitlines()[-30:])
        if code != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            kind = classify_conversion_failure(log)
            raise ConversionFailed(
                f"convert_hf_to_gguf.py refused {model_dir} ({kind}): {_failure_line(log)}", kind, tail
            )
        check_gguf_file(partial)
        os.replace(partial, out_path)
        return ConversionResult(out_path, time.monotonic() - started, tail)

    def _convert_forked(
        self, converter: Path, overrides: dict[str, Any], arguments: list[str]
    ) -> tuple[int | None, str]:
        import torch  # noqa: F401  (imported once here, inherited by every forked conversion)
        import transformers  # noqa: F401

        from jpslm_assets.resources.llama_cpp_worker import convert, run_forked

        descriptor, name = tempfile.mkstemp(prefix="convert-", suffix=".log")
        os.close(descriptor)
        try:
            code = run_forked(
                lambda: convert(str(converter), overrides, arguments), Path(name), self.convert_timeout_s
            )
            return code, Path(name).read_text(errors="replace")
        finally:
            Path(name).unlink(missing_ok=True)

    def _convert_in_subprocess(
        self, converter: Path, overrides: dict[str, Any], arguments: list[str]
    ) -> tuple[int | None, str]:
        # The worker's `convert` puts the sdist's own gguf-py first on sys.path itself.
        return _run_worker(
            ["convert", str(converter), json.dumps(overrides), *arguments], self.convert_timeout_s
        )

    def quantize(self, source: Path, out_path: Path, quant: QuantizeType = "q4_k_m") -> float:
        """Quantize a GGUF with ``llama_cpp.llama_model_quantize``; returns seconds taken."""
        check_gguf_file(source)
        partial = partial_path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        code, log = _run_worker(
            ["quantize", str(source), str(partial), quant, str(self.quantize_threads)], self.quantize_timeout_s
        )
        if code is None:
            partial.unlink(missing_ok=True)
            raise LlamaCppToolError(
                f"quantizing {source} to {quant} ran past quantize_timeout_s={self.quantize_timeout_s:.0f}"
            )
        if code != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            raise LlamaCppToolError(
                f"llama_model_quantize({source.name} -> {quant}) failed (exit {code}): {_failure_line(log)}"
            )
        check_gguf_file(partial)
        os.replace(partial, out_path)
        return time.monotonic() - started


def _run_worker(arguments: list[str], timeout_s: float) -> tuple[int | None, str]:
    """``python -m llama_cpp_worker ARGUMENTS`` in a new interpreter: (exit code, stdout + stderr), or (None, "")
    when it ran past ``timeout_s`` (it is killed)."""
    env = dict(os.environ)
    # The product's own folder, for `-m` wherever the package is imported from.
    paths = [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", WORKER, *arguments],
            capture_output=True, text=True, env=env, timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, ""
    return completed.returncode, (completed.stdout or "") + (completed.stderr or "")


def pip_index_url() -> str:
    """The index pip installs from: ``$PIP_INDEX_URL``, else pip's configured ``index-url``, else PyPI."""
    configured = os.environ.get("PIP_INDEX_URL")
    if configured:
        return configured.split()[0]
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
    )
    for line in listed.stdout.splitlines():
        name, _, value = line.partition("=")
        if name.strip().endswith(".index-url") and value.strip():
            return value.strip().strip("'\"")
    return "https://pypi.org/simple"


def fetch_sdist_from_index(dist: str, version: str, folder: Path, index_url: str | None = None) -> Path:
    """Download ``dist==version``'s sdist into ``folder`` through the index's JSON simple API (PEP 691).

    The file's sha256 is checked against the index's; any failure raises ``LlamaCppToolError``.
    """
    import hashlib

    import httpx

    index = (index_url or pip_index_url()).rstrip("/")
    project = re.sub(r"[-_.]+", "-", dist).lower()
    wanted = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}.tar.gz"
    try:
        with httpx.Client(timeout=httpx.Timeout(120.0, connect=15.0), follow_redirects=True) as client:
            listing = client.get(
                f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
            )
            listing.raise_for_status()
            if "json" not in listing.headers.get("content-type", ""):
                raise LlamaCppToolError(f"{index} does not offer the JSON simple API")
            files = [entry for entry in listing.json().get("files", []) if entry.get("filename") == wanted]
            if not files:
                raise LlamaCppToolError(f"{index} lists no {wanted}")
            expected = files[0].get("hashes", {}).get("sha256")
            url = httpx.URL(str(listing.url)).join(files[0]["url"])
            target = folder / wanted
            digest = hashlib.sha256()
            with client.stream("GET", url) as response, target.open("wb") as out:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except (httpx.HTTPError, ValueError, KeyError, OSError) as exc:
        raise LlamaCppToolError(f"could not fetch {wanted} from {index} ({exc})") from exc
    if expected and digest.hexdigest() != expected:
        target.unlink(missing_ok=True)
        raise LlamaCppToolError(f"{wanted} from {index} has sha256 {digest.hexdigest()}, the index says {expected}")
    return target


def _unpack_converter(sdist: Path, folder: Path) -> None:
    """Unpack only the converter's Python parts of ``vendor/llama.cpp`` from the sdist into ``folder``."""
    try:
        archive = tarfile.open(sdist, "r:gz")  # noqa: SIM115 (closed by the `with` below)
    except (OSError, tarfile.TarError) as exc:
        raise LlamaCppToolError(f"{sdist} is not a readable .tar.gz sdist ({exc}); fetch it again.") from exc
    with archive:
        members = []
        for member in archive.getmembers():
            parts = member.name.split("/", 3)
            # <name>-<version>/vendor/llama.cpp/<rest>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rest = parts[3]
            if not any(rest == part or rest.startswith(part) for part in _SDIST_PARTS):
                continue
            if not (member.isfile() or member.isdir()):
                continue
            member.name = rest
            members.append(member)
        if not any(member.name == "convert_hf_to_gguf.py" for member in members):
            raise LlamaCppToolError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py; is it llama-cpp-python?")
        folder.mkdir(parents=True, exist_ok=True)
        archive.extractall(folder, members=members, filter="data")
