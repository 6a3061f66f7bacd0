"""The gateway as users run it, `python uni_api.py --config ...`, in a subprocess whose RSS, file descriptors,
log and exit code the reliability tests can read (Linux /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from conftest import free_port, to_yaml

SCRIPT = Path(__file__).resolve().parent.parent / "uni_api.py"
CLEARED = ("CONFIG_URL", "HOST", "PORT", "TIMEOUT", "DEBUG", "DB_PATH", "GRACE_PERIOD", "HEADER_TIMEOUT", "REDIS_URL",
           "WORKERS", "INSTANCE_ID")


class GatewayProcess:
    def __init__(self, config: dict[str, Any], directory: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.config_path = directory / "api.yaml"
        self.config_path.write_text(to_yaml(config))
        self.log_path = directory / "gateway.log"
        environment = {k: v for k, v in os.environ.items() if k not in CLEARED}
        environment.update({"DISABLE_DATABASE": "true", **env})
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--config", str(self.config_path), "--host", "127.0.0.1",
                 "--port", str(self.port), *args], cwd=directory, env=environment, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if client.get("/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"gateway not ready within {timeout} s:\n{self.log()}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> list[str]:
        """What each open descriptor points at (`socket:[...]`, files, pipes)."""
        fd_dir = Path(f"/proc/{self.pid}/fd")
        targets = []
        for entry in fd_dir.iterdir():
            try:
                targets.append(os.readlink(entry))
            except FileNotFoundError:  # closed while listing
                continue
        return targets

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def gateway_process(config: dict[str, Any], directory: Path, *args: str, **env: str) -> Iterator[GatewayProcess]:
    """A started, ready gateway subprocess; always stopped afterwards."""
    gateway = GatewayProcess(config, directory, *args, **env)
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()
