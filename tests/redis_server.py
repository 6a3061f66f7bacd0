"""A real redis-server (Debian's package; valkey-server works too) on a free 127.0.0.1 port, without persistence,
for the shared-state tests (the `redis_server` fixture in conftest.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port

BINARY = shutil.which("redis-server") or shutil.which("valkey-server")


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert BINARY is not None
        self.process = subprocess.Popen(
            [BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {self.process.poll()})")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it outright (SIGKILL), as a crashed Redis goes: nothing is flushed, connections just drop."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stored(self) -> dict[str, bytes]:
        """Every key and (for strings) value in the database, read with redis-py's plain client."""
        import redis

        with redis.Redis(port=self.port) as client:
            names = [name.decode() for name in client.keys("*")]
            return {name: client.dump(name) or b"" for name in names}
