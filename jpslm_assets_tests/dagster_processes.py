"""Start and stop Dagster's long-running processes (UI, daemon) for tests, as a user would run them.

Each process starts in its own session (``setsid``) with output going to a log file, and is stopped by
signalling its whole process group: ``dagster dev`` started from a non-interactive shell ignores SIGTERM
itself, and its children (webserver, daemon, code servers, run workers) must not outlive the test.

A port that is already taken is refused before anything starts, with a message naming the port and the
fix; ``dagster dev`` itself would otherwise keep its daemon running with a dead webserver behind it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


class PortInUseError(RuntimeError):
    """The TCP port the UI should listen on is taken by another process."""


class ProcessStartError(RuntimeError):
    """A Dagster process exited or did not become ready; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def ensure_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` when ``host:port`` cannot be bound (another server listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Without SO_REUSEADDR, so a port still held by a listener fails here exactly as the server would.
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"cannot start the Dagster UI: {host}:{port} is already in use ({exc.strerror}). Stop the "
                f"process listening there (e.g. `ss -ltnp 'sport = :{port}'` shows it) or choose another "
                "port with --port."
            ) from exc


@dataclass
class DagsterProcess:
    """A running Dagster process group and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout`` seconds.

        Returns how it ended: ``"exited"`` (already gone), ``"SIGTERM"`` (clean shutdown) or ``"SIGKILL"``.
        """
        try:
            group = os.getpgid(self.process.pid)
        except ProcessLookupError:
            return "exited"
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                return "exited"
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.process.poll() is not None and not _group_alive(group):
                    return sig.name
                time.sleep(0.2)
        return "SIGKILL"

    def __enter__(self) -> DagsterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_interrupts() -> None:
    """Runs in the child before exec. A parent started in the background of a non-interactive shell
    ignores SIGINT, and the child inherits that; `dagster dev` maps SIGTERM to its SIGINT handler, so it
    would ignore SIGTERM too. Restoring the default lets Python install its KeyboardInterrupt handler and
    shut Dagster down cleanly on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(
    name: str, command: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path
) -> DagsterProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_interrupts,
        )
    return DagsterProcess(name, process, log_path)


def start_dagster_ui(
    *,
    target: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    with_daemon: bool = True,
    check_port: bool = True,
    timeout: float = 180.0,
) -> DagsterProcess:
    """Start ``dagster dev`` (UI + daemon) or ``dagster-webserver`` alone and wait until the UI answers.

    ``target`` is the code location arguments, e.g. ``["-m", "jpslm_assets.definitions"]``.
    """
    port = port or free_port(host)
    if check_port:
        ensure_port_free(host, port)
    program = ["dagster", "dev"] if with_daemon else ["dagster-webserver"]
    host_flag = "--host" if with_daemon else "-h"
    command = [*program, *target, host_flag, host, "--port", str(port)]
    server = _spawn("dagster-ui", command, env, log_path, cwd)
    server.url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail = server.log_tail(200)
        if "address already in use" in tail:
            server.stop()
            line = next(text for text in tail.splitlines() if "address already in use" in text)
            raise PortInUseError(
                f"cannot start the Dagster UI: {host}:{port} is already in use ({line.strip()}). Stop the "
                "process listening there or choose another port with --port."
            )
        if not server.alive():
            raise ProcessStartError(f"{' '.join(command)} exited with {server.process.returncode}:\n{tail}")
        try:
            response = httpx.get(f"{server.url}/server_info", timeout=2.0)
            if response.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise ProcessStartError(
        f"the Dagster UI did not answer on {server.url} within {timeout:.0f} s:\n{server.log_tail()}"
    )


def start_daemon(
    *, target: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path
) -> DagsterProcess:
    """``dagster-daemon run``: schedules, sensors and the run queue of the instance in ``DAGSTER_HOME``."""
    daemon = _spawn("dagster-daemon", ["dagster-daemon", "run", *target], env, log_path, cwd)
    time.sleep(1.0)
    if not daemon.alive():
        raise ProcessStartError(
            f"dagster-daemon exited with {daemon.process.returncode}:\n{daemon.log_tail()}"
        )
    return daemon
