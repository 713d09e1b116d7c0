"""Throwaway Mosquitto brokers for tests, each on a free loopback port.

`mosquitto_broker` writes a config file into the test's temporary directory, starts
`mosquitto -c` on 127.0.0.1 and stops it on exit, whether the body raised or not. The
broker log is kept in that directory, and start errors quote its last lines.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20


class BrokerInfo:
    """A running Mosquitto broker: its address, files, and controls to stop and restart it."""

    def __init__(
        self,
        directory: Path,
        *,
        password_file: Path | None,
        acl_file: Path | None,
        persistence: bool,
        allow_anonymous: bool,
        extra_config: str,
    ) -> None:
        self.host = HOST
        self.port = 0
        self.directory = directory
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self.persistence_path = directory / "persistence"
        self._password_file = password_file
        self._acl_file = acl_file
        self._persistence = persistence
        self._allow_anonymous = allow_anonymous
        self._extra_config = extra_config
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the broker on `self.port`, or on a free port when no port is chosen yet.

        Raises RuntimeError when Mosquitto is not installed, exits early or does not accept
        connections within START_TIMEOUT_S.
        """
        if self.running:
            raise RuntimeError(f"Mosquitto is already running on port {self.port}")
        if self.port:
            self._start_on_port(self.port)
            return

        # Another process may take the free port between the probe and Mosquitto's bind,
        # so a failed start on a fresh port is retried on another one.
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = _free_port()
            try:
                self._start_on_port(port)
            except RuntimeError:
                if attempt == PORT_ATTEMPTS:
                    raise
                continue
            return

    def stop(self) -> None:
        """Stop the broker with SIGTERM, so it saves its persistence file, or SIGKILL after STOP_TIMEOUT_S."""
        process = self._process
        self._process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop the broker and start it again on the same port, keeping its persistence file."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _start_on_port(self, port: int) -> None:
        # Debian installs the broker in /usr/sbin, which is not on every user's PATH.
        binary = shutil.which("mosquitto", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
        if binary is None:
            raise RuntimeError("mosquitto is not installed; install Debian's `mosquitto` package")

        self.port = port
        self.config_path.write_text(self._render_config(), encoding="utf-8")
        if self._persistence:
            self.persistence_path.mkdir(exist_ok=True)

        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._process = process
        try:
            self._wait_until_accepting(process)
        except RuntimeError:
            self.stop()
            raise

    def _wait_until_accepting(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            status = process.poll()
            if status is not None:
                raise RuntimeError(
                    f"mosquitto exited with status {status} while starting on port {self.port}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                # An accepted TCP connection is the readiness check, because it is what clients need.
                time.sleep(0.05)
        raise RuntimeError(
            f"mosquitto did not accept connections on {self.host}:{self.port} within "
            f"{START_TIMEOUT_S:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def _render_config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
            # Run as the current user: as root, Mosquitto would otherwise switch to the
            # `mosquitto` user, which cannot read files under pytest's 0700 temporary directory.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self._persistence:
            # Mosquitto writes mosquitto.db at a clean exit, so a SIGTERM restart keeps
            # retained messages and the QoS 1 queues of sessions with clean_session=False.
            lines += ["persistence true", f"persistence_location {self.persistence_path}"]
        else:
            lines.append("persistence false")
        if self._password_file is not None:
            lines.append(f"password_file {self._password_file}")
        if self._acl_file is not None:
            lines.append(f"acl_file {self._acl_file}")
        if self._extra_config:
            lines.append(self._extra_config.strip())
        return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mosquitto_broker(
    tmp_path: str | os.PathLike[str],
    *,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    persistence: bool = True,
    allow_anonymous: bool | None = None,
    extra_config: str = "",
) -> Iterator[BrokerInfo]:
    """Start Mosquitto on a free loopback port and yield its `BrokerInfo`; stop it on exit.

    Anonymous clients are allowed unless a password file is given; `allow_anonymous`
    overrides that. `extra_config` is appended to the generated mosquitto.conf as written.
    The config, log and persistence files live in `tmp_path/mosquitto`.
    """
    directory = Path(tmp_path) / "mosquitto"
    directory.mkdir(parents=True, exist_ok=True)
    broker = BrokerInfo(
        directory,
        password_file=password_file,
        acl_file=acl_file,
        persistence=persistence,
        allow_anonymous=password_file is None if allow_anonymous is None else allow_anonymous,
        extra_config=extra_config,
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
