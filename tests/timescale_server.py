"""Throwaway PostgreSQL + TimescaleDB clusters for tests, run by scripts/timescaledb.sh."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "timescaledb.sh"

# Exit status of `timescaledb.sh start` when the server or the extension is not installed.
EXIT_NOT_INSTALLED = 3

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 90


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _make_cluster_dir() -> Path:
    """Create an empty directory for the cluster under /tmp.

    /tmp is searchable by the postgres user, which owns the cluster when the tests run
    as root, whereas pytest's tmp_path sits under a 0700 directory. A short path also
    keeps the unix socket path within its 107-byte limit.
    """
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix="pccc-pg-", dir=base))


@contextlib.contextmanager
def timescale_cluster(tmp_dir: str | os.PathLike[str]) -> Iterator[str]:
    """Start a PostgreSQL cluster with TimescaleDB preloaded and yield its URL.

    The URL is ``postgresql://gateway@127.0.0.1:PORT/gateway``, where the role
    ``gateway`` is a superuser, so tests can run ``CREATE EXTENSION timescaledb``.
    On exit the cluster is stopped and its directory removed, whether the body
    raised or not. The server log is copied to ``tmp_dir/postgres.log`` first.

    Raises RuntimeError when TimescaleDB is not installed or the cluster fails to
    start or stop.
    """
    with timescale_cluster_handle(tmp_dir) as cluster:
        yield cluster.url


@dataclasses.dataclass(frozen=True)
class TimescaleCluster:
    """A running throwaway cluster that a test may stop and start again."""

    url: str
    directory: Path

    def stop(self) -> None:
        """Stop the server with a fast shutdown, keeping the data directory for `start`."""
        stopped = _run_script("stop", str(self.directory), timeout=STOP_TIMEOUT_S)
        if stopped.returncode != 0:
            raise RuntimeError(f"{SCRIPT.name} stop {self.directory} failed:\n{stopped.stderr}")

    def start(self) -> None:
        """Start the stopped server again on the same data directory and port.

        `timescaledb.sh start` only creates new clusters, so this runs the cluster's own
        pg_ctl, as the user that owns the data directory.
        """
        data = self.directory / "data"
        bindir = Path((self.directory / "bindir").read_text().strip())
        command = [
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(self.directory / "postgres.log"),
            "-w", "-t", str(START_TIMEOUT_S), "start",
        ]
        owner = data.owner()
        if owner != pwd.getpwuid(os.geteuid()).pw_name:
            command = ["runuser", "-u", owner, "--", *command]
        started = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 10,
            check=False,
            cwd="/",
        )
        if started.returncode != 0:
            raise RuntimeError(
                f"restarting PostgreSQL in {data} failed with exit status {started.returncode}:\n"
                f"{started.stdout}{started.stderr}"
            )


@contextlib.contextmanager
def timescale_cluster_handle(tmp_dir: str | os.PathLike[str]) -> Iterator[TimescaleCluster]:
    """Like `timescale_cluster`, but yield a `TimescaleCluster` that can be stopped and restarted."""
    cluster_dir = _make_cluster_dir()
    try:
        started = _run_script("start", str(cluster_dir), timeout=START_TIMEOUT_S)
        if started.returncode == EXIT_NOT_INSTALLED:
            raise RuntimeError(
                "PostgreSQL with TimescaleDB is not installed; run "
                f"`{SCRIPT.relative_to(SCRIPT.parents[1])} install` as root first"
            )
        if started.returncode != 0:
            raise RuntimeError(
                f"{SCRIPT.name} start {cluster_dir} failed with exit status "
                f"{started.returncode}:\n{started.stderr}"
            )
        lines = started.stdout.strip().splitlines()
        if not lines or not lines[-1].startswith("postgresql://"):
            raise RuntimeError(
                f"{SCRIPT.name} start printed no connection URL; output was:\n"
                f"{started.stdout}{started.stderr}"
            )
        yield TimescaleCluster(url=lines[-1], directory=cluster_dir)
    finally:
        _stop_and_remove(cluster_dir, Path(tmp_dir))


def _stop_and_remove(cluster_dir: Path, tmp_dir: Path) -> None:
    """Stop the cluster if one was created, keep its log in tmp_dir, remove cluster_dir."""
    stop_error = ""
    if (cluster_dir / "data").exists():
        stopped = _run_script("stop", str(cluster_dir), timeout=STOP_TIMEOUT_S)
        if stopped.returncode != 0:
            stop_error = stopped.stderr

    server_log = cluster_dir / "postgres.log"
    if server_log.exists() and tmp_dir.is_dir():
        shutil.copyfile(server_log, tmp_dir / "postgres.log")

    # A cluster that failed to stop keeps its directory, so its files are there to inspect.
    if stop_error:
        raise RuntimeError(
            f"{SCRIPT.name} stop {cluster_dir} failed; the directory is left in place:\n"
            f"{stop_error}"
        )
    shutil.rmtree(cluster_dir, ignore_errors=True)
