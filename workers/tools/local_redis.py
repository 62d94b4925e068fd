"""A private ``redis-server`` on a free loopback port, for the demo and the tests.

Configured like production (append-only file with ``appendfsync everysec``, ``maxmemory-policy noeviction``,
a password) so what the tests exercise is what compose runs.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from gpufleet.workers.errors import WorkerStartError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    """Start and stop a private redis-server.

    Args:
        data_dir: where its append-only file lives (kept across :meth:`restart`).
        port: a port, or None for a free one.
        password: a password, or None for a random one.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, password: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.password = password if password is not None else secrets.token_hex(8)
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server and wait until it answers PING.

        Raises:
            WorkerStartError: redis-server is not installed or did not come up.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            raise WorkerStartError(
                "redis-server is not installed: `apt-get install redis-server` (or point GPUFLEET_BROKER_URL at "
                "a running Redis)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--databases",
            "256",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise WorkerStartError(f"redis-server did not start on port {self.port}; see {self.data_dir / 'redis.log'}")

    def ping(self) -> bool:
        """Whether the server answers an authenticated PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (it flushes its append-only file on SIGTERM)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port and data (jobs in the append-only file survive)."""
        self.stop()
        self.start()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
