"""Shared fixtures: a registered site, a real Mosquitto with credentials and ACL, a
simulated command centre, and the gateway as a subprocess."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from gateway import credentials, journal, registry
from simulators.command_center import CommandCenter
from tests.gateway_process import GatewayProcess
from tests.mosquitto_server import BrokerInfo, mosquitto_broker

SECRET = "test-secret"
GATEWAY_USER = "gateway"
GATEWAY_PASSWORD = "gateway-pass"
DEVICE_PASSWORD = "device-pass"
BRIDGE_USER = "bridge"
FACILITY = registry.Facility(
    id="HN-0001",
    name="Chung cư Sông Hồng",
    address="12 Đường Thanh Niên",
    commune="Phường Tây Hồ",
    province="Hà Nội",
    latitude=21.0503,
    longitude=105.8372,
    team="HN-DOI-02",
)
ZONES = {1: "Tầng 1 - Sảnh", 2: "Tầng hầm B1 - Bãi xe", 3: "Phòng bơm"}
DEVICES = ["DEV-001", "DEV-002", "DEV-003"]


def register_site(data_dir: Path, devices: list[str] = DEVICES) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    with closing(journal.connect(data_dir / "journal.db")) as conn:
        journal.migrate(conn)
        conn.execute("BEGIN")
        registry.add_facility(conn, FACILITY, ZONES)
        for device_id in devices:
            registry.add_device(
                conn,
                registry.make_device(id=device_id, facility_id=FACILITY.id, password_hash=credentials.hash_password(DEVICE_PASSWORD)),
            )
        conn.execute("COMMIT")


def write_broker_auth(directory: Path, devices: list[str]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    entries = [(device_id, credentials.hash_password(DEVICE_PASSWORD)) for device_id in devices]
    entries += [(GATEWAY_USER, credentials.hash_password(GATEWAY_PASSWORD)), (BRIDGE_USER, credentials.hash_password(DEVICE_PASSWORD))]
    password_file = directory / "passwd"
    password_file.write_text(credentials.password_file(entries))
    acl_file = directory / "acl"
    # A bridge (a concentrator relaying for several devices) may write any device topic; the
    # gateway's own identity check must still catch a payload that names another device.
    acl_file.write_text(f"user {BRIDGE_USER}\ntopic write pccc/v1/#\n\n" + credentials.acl_file(GATEWAY_USER))
    return password_file, acl_file


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    register_site(directory)
    return directory


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerInfo]:
    password_file, acl_file = write_broker_auth(tmp_path / "auth", DEVICES + ["DEV-999"])
    with mosquitto_broker(tmp_path, password_file=password_file, acl_file=acl_file) as info:
        yield info


@pytest.fixture
async def centre() -> AsyncIterator[CommandCenter]:
    server = CommandCenter(secret=SECRET)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def gateway_args(broker: BrokerInfo, centre_url: str) -> list[str]:
    return [
        "--mqtt", f"mqtt://{GATEWAY_USER}:{GATEWAY_PASSWORD}@{broker.host}:{broker.port}",
        "--forward", centre_url,
        "--forward-secret", SECRET,
    ]


@pytest.fixture
def gateway_factory(data_dir: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(args: list[str], *, directory: Path | None = None) -> GatewayProcess:
        process = GatewayProcess(directory or data_dir, args)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.alive:
            process.kill()


@pytest.fixture
def gateway(gateway_factory, broker: BrokerInfo, centre: CommandCenter) -> GatewayProcess:
    process = gateway_factory(gateway_args(broker, centre.url))
    process.start()
    return process


def mosquitto_pub(broker: BrokerInfo, topic: str, payload: bytes | str, *, user: str, password: str = DEVICE_PASSWORD, qos: int = 1) -> None:
    """Publish one message with Debian's mosquitto_pub and wait for the broker's ack."""
    data = payload.encode() if isinstance(payload, str) else payload
    completed = subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", user, "-P", password,
         "-q", str(qos), "-t", topic, "-s"],
        input=data,
        capture_output=True,
        timeout=10,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
