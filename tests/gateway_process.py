"""The gateway as a separate process, the way it runs in production, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PortTaken(Exception):
    """Another process bound the status port between choosing and binding it."""


class GatewayProcess:
    """`gateway run` in a subprocess; its log goes to `data_dir/gateway.log`."""

    def __init__(self, data_dir: Path, args: list[str], *, cwd: Path | None = None) -> None:
        self.data_dir = data_dir
        self.http_port = free_port()
        self.args = args
        self.cwd = cwd
        self.log_path = data_dir / "gateway.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_for_mqtt: bool = True) -> None:
        """Start the process and wait until it is healthy; retry on a port taken meanwhile."""
        for attempt in range(3):
            try:
                self._start_once(wait_for_mqtt)
                return
            except PortTaken:
                self.http_port = free_port()
        raise RuntimeError(f"gateway could not bind a free status port in 3 attempts:\n{self.log_tail()}")

    def _start_once(self, wait_for_mqtt: bool) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "gateway.cli.app", "run", "--data-dir", str(self.data_dir),
                   "--http", f"127.0.0.1:{self.http_port}", "--log-level", "debug", *self.args]
        env = {**os.environ, "GATEWAY_LANG": "en"}
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, env=env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if "address already in use" in self.log_tail(5) and str(self.http_port) in self.log_tail(5):
                    raise PortTaken(self.http_port)
                raise RuntimeError(f"gateway exited with {self._process.returncode}:\n{self.log_tail()}")
            health = self.health()
            if health is not None and (health.get("mqtt") == "up" or not wait_for_mqtt):
                return
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not become healthy within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())
        except OSError:
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Return one sample of the Prometheus text page, 0.0 when it is absent."""
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric_name, _, label_text = key.partition("{")
            if metric_name != name:
                continue
            present = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if present == wanted:
                return float(value)
        return 0.0

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """Stop the process at once with SIGKILL, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> int:
        if self._process is None:
            return 0
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
                raise
        return self._process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
