"""End to end: a transmitter that falls silent raises one communication loss at the command
centre, and two heartbeats on time restore it."""

from __future__ import annotations

import asyncio
from contextlib import closing

import pytest

from drivers.mqtt import protocol
from gateway import journal, registry
from tests.conftest import gateway_args, mosquitto_pub

pytestmark = pytest.mark.mosquitto


async def test_silent_device_raises_then_restores(gateway_factory, broker, centre, data_dir, tmp_path):
    """Test that silence past the window raises 350 once, and two on-time heartbeats restore it."""
    with closing(journal.connect(data_dir / "journal.db")) as conn:
        conn.execute("BEGIN")
        registry.add_device(conn, registry.make_device(id="DEV-003", facility_id="HN-0001", heartbeat_s=1, window_s=3))
        conn.execute("COMMIT")
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nstartup_grace_s = 0\n")
    gateway = gateway_factory(["--config", str(config), *gateway_args(broker, centre.url)])
    gateway.start()

    # One heartbeat, then silence: the loss must come after the 3 s window.
    mosquitto_pub(broker, protocol.heartbeat_topic("DEV-003"), protocol.encode_heartbeat(boot=1, seq=1), user="DEV-003")
    events = await centre.wait_for(lambda events: any(e["event"]["device"]["id"] == "DEV-003" for e in events), timeout=15)
    losses = [e["event"] for e in events if e["event"]["device"]["id"] == "DEV-003"]
    assert len(losses) == 1
    assert losses[0]["signal"]["code"] == "350"
    assert losses[0]["signal"]["qualifier"] == "new"
    assert losses[0]["signal"]["event_class"] == "trouble"
    assert losses[0]["device"]["source"] == "supervision"
    assert losses[0]["facility"]["id"] == "HN-0001"

    for seq in range(2, 6):
        mosquitto_pub(broker, protocol.heartbeat_topic("DEV-003"), protocol.encode_heartbeat(boot=1, seq=seq), user="DEV-003")
        await asyncio.sleep(0.5)
    events = await centre.wait_for(
        lambda events: any(e["event"]["signal"] and e["event"]["signal"]["qualifier"] == "restore" for e in events), timeout=10
    )
    restores = [e["event"] for e in events if e["event"]["signal"] and e["event"]["signal"]["qualifier"] == "restore"]
    assert [r["signal"]["code"] for r in restores] == ["350"]
    assert restores[0]["incident"]["id"] == losses[0]["incident"]["id"]


async def test_device_status_reports_heartbeat(gateway, broker):
    """Test that `gateway device status` shows a device online with its last heartbeat."""
    import json
    import subprocess
    import sys

    heartbeat = protocol.encode_heartbeat(boot=1, seq=1, battery_v=12.9, rssi=-71, link="eth", mains=True)
    mosquitto_pub(broker, protocol.heartbeat_topic("DEV-002"), heartbeat, user="DEV-002")
    await asyncio.sleep(0.5)

    completed = subprocess.run(
        [sys.executable, "-m", "gateway.cli.app", "device", "status", "DEV-002", "--json", "--http", f"127.0.0.1:{gateway.http_port}"],
        capture_output=True, timeout=30, env={"GATEWAY_LANG": "en", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr.decode()
    (state,) = json.loads(completed.stdout)
    assert state["device_id"] == "DEV-002"
    assert state["online"] is True
    assert state["last_heartbeat"]["battery_v"] == 12.9
    assert state["last_heartbeat"]["rssi"] == -71
    assert state["last_heartbeat"]["link"] == "eth"
