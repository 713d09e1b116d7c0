"""Tests for the `gateway` command, run as a subprocess in English with a temporary data folder."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from drivers.contact_id import encode_contact_id
from drivers.mqtt import protocol
from gateway.signal import Qualifier

COMMAND_TIMEOUT_S = 60
EVENT_TOPIC = "pccc/v1/DEV-001/event"
GOOD_EVENT = '{"v":1,"boot":1,"seq":5,"ts":"2025-03-01T15:00:00+07:00","code":"110","q":"E","zone":3,"label":"Kho sợi"}'


def gateway(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `gateway ARGS` with English messages; fail the test if it runs past the timeout."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    env.update({"GATEWAY_LANG": "en", "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.app", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=COMMAND_TIMEOUT_S,
    )


def facilities_in(data_dir: Path) -> list[str]:
    path = data_dir / "journal.db"
    if not path.exists():
        return []
    with closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM facilities ORDER BY id")]


def test_decode_mqtt_good_event(tmp_path: Path):
    """Test that `decode mqtt` prints one JSON line with the event's code, zone and label."""
    result = gateway("decode", "mqtt", "--topic", EVENT_TOPIC, "--payload", GOOD_EVENT, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    signal = json.loads(lines[0])
    assert signal["code"] == "110"
    assert signal["event_class"] == "fire"
    assert signal["qualifier"] == "new"
    assert signal["zone"] == 3
    assert signal["zone_label"] == "Kho sợi"
    assert signal["device_id"] == "DEV-001"


def test_decode_mqtt_good_heartbeat(tmp_path: Path):
    """Test that `decode mqtt` prints a heartbeat as one JSON line."""
    payload = protocol.encode_heartbeat(boot=1, seq=2, battery_v=12.5).decode()

    result = gateway("decode", "mqtt", "--topic", "pccc/v1/DEV-001/heartbeat", "--payload", payload, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["battery_v"] == 12.5


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (EVENT_TOPIC, '{"v":1,"boot":1,"seq":"5"}', "invalid_field"),
        (EVENT_TOPIC, "{not json", "invalid_json"),
        (EVENT_TOPIC, GOOD_EVENT.replace('"110"', '"999"'), "unknown_code"),
        ("pccc/v1/AB/event", GOOD_EVENT, "bad_topic"),
    ],
)
def test_decode_mqtt_bad_payload(tmp_path: Path, topic: str, payload: str, reason: str):
    """Test that a bad message exits 2 with exactly one stderr line that gives the reason."""
    result = gateway("decode", "mqtt", "--topic", topic, "--payload", payload, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"[{reason}]: " in lines[0]


def test_decode_contact_id_good_message(tmp_path: Path):
    """Test that `decode contact-id` prints the signal of a valid 16-digit message."""
    digits = encode_contact_id("1234", Qualifier.NEW, "110", 1, 15)

    result = gateway("decode", "contact-id", digits, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    signal = json.loads(lines[0])
    assert signal["device_id"] == "1234"
    assert signal["code"] == "110"
    assert signal["qualifier"] == "new"
    assert signal["group"] == 1
    assert signal["zone"] == 15


def test_decode_contact_id_bad_checksum(tmp_path: Path):
    """Test that a bad checksum exits 2 and stderr gives the expected checksum digit."""
    result = gateway("decode", "contact-id", "1234 18 1 110 01 015 2", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "[bad_checksum]: " in result.stderr
    assert "should be '1'" in result.stderr


def test_device_add_and_list(tmp_path: Path):
    """Test that a facility and a device added with --data-dir appear in `device list`."""
    data_dir = tmp_path / "data"

    facility = gateway(
        "facility", "add", "--id", "HN-0001", "--name", "Chung cư Sông Hồng", "--province", "Hà Nội",
        "--lat", "21.0503", "--lon", "105.8372", "--zones", "1:Tầng 1;2:Kho", "--data-dir", data_dir,
        cwd=tmp_path,
    )
    device = gateway("device", "add", "DEV-001", "--facility", "HN-0001", "--password", "right", "--data-dir", data_dir, cwd=tmp_path)
    listing = gateway("device", "list", "--data-dir", data_dir, cwd=tmp_path)

    assert facility.returncode == 0, facility.stderr
    assert "HN-0001" in facility.stdout
    assert device.returncode == 0, device.stderr
    assert "MQTT user name: DEV-001" in device.stdout
    assert "MQTT password: right" in device.stdout
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if "DEV-001" in line]
    assert len(rows) == 1
    assert "HN-0001" in rows[0]
    assert "mqtt" in rows[0]
    assert not (tmp_path / "var").exists()


def test_device_add_unknown_facility(tmp_path: Path):
    """Test that adding a device for a facility that does not exist exits 2 and saves nothing."""
    data_dir = tmp_path / "data"

    result = gateway("device", "add", "DEV-001", "--facility", "NO-SUCH", "--data-dir", data_dir, cwd=tmp_path)
    listing = gateway("device", "list", "--data-dir", data_dir, cwd=tmp_path)

    assert result.returncode == 2
    assert "NO-SUCH" in result.stderr
    assert "DEV-001" not in listing.stdout


def test_device_add_bad_id(tmp_path: Path):
    """Test that a device id with characters outside A-Z a-z 0-9 _ - exits 2."""
    result = gateway("device", "add", "DEV 001", "--data-dir", tmp_path / "data", cwd=tmp_path)

    assert result.returncode == 2
    assert "device is invalid" in result.stderr


def test_facility_import_bad_latitude(tmp_path: Path):
    """Test that a CSV with a bad latitude on line 3 exits 2 naming line 3, and imports no line."""
    data_dir = tmp_path / "data"
    csv_file = tmp_path / "facilities.csv"
    csv_file.write_text(
        "id,name,province,latitude,longitude,zones\n"
        "HN-0001,Chung cư Sông Hồng,Hà Nội,21.0503,105.8372,1:Tầng 1\n"
        "HN-0002,Kho Long Biên,Hà Nội,north,105.89,\n"
        "HN-0003,Chợ Đồng Xuân,Hà Nội,21.0380,105.8497,\n",
        encoding="utf-8",
    )

    result = gateway("facility", "import", csv_file, "--data-dir", data_dir, cwd=tmp_path)

    assert result.returncode == 2
    assert "line 3" in result.stderr
    assert "latitude" in result.stderr
    assert facilities_in(data_dir) == []


def test_facility_import_out_of_range_latitude(tmp_path: Path):
    """Test that a latitude beyond 90 degrees is rejected with its line number."""
    data_dir = tmp_path / "data"
    csv_file = tmp_path / "facilities.csv"
    csv_file.write_text("id,name,latitude,longitude\nHN-0001,Tòa A,91.5,105.8\n", encoding="utf-8")

    result = gateway("facility", "import", csv_file, "--data-dir", data_dir, cwd=tmp_path)

    assert result.returncode == 2
    assert "line 2" in result.stderr
    assert facilities_in(data_dir) == []


def test_facility_import_good_file(tmp_path: Path):
    """Test that a valid CSV imports every facility."""
    data_dir = tmp_path / "data"
    csv_file = tmp_path / "facilities.csv"
    csv_file.write_text(
        "id,name,province,latitude,longitude,team,zones\n"
        "HN-0001,Chung cư Sông Hồng,Hà Nội,21.0503,105.8372,HN-DOI-02,1:Tầng 1;2:Kho\n"
        "HCM-0001,Nhà máy dệt Tân Bình,Thành phố Hồ Chí Minh,10.8013,106.6522,HCM-DOI-07,\n",
        encoding="utf-8",
    )

    result = gateway("facility", "import", csv_file, "--data-dir", data_dir, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "2 facilities imported" in result.stdout
    assert facilities_in(data_dir) == ["HCM-0001", "HN-0001"]


def test_run_unknown_config_key_exits(tmp_path: Path):
    """Test that `run` with an unknown config key exits 2 naming the key, without starting."""
    config_file = tmp_path / "bad.toml"
    config_file.write_text('[mqtt]\nurll = "mqtt://127.0.0.1:1883"\n', encoding="utf-8")

    result = gateway("run", "--config", config_file, "--data-dir", tmp_path / "data", cwd=tmp_path)

    assert result.returncode == 2
    assert "mqtt.urll" in result.stderr
    assert "unknown key" in result.stderr
    assert str(config_file) in result.stderr
    assert not (tmp_path / "data").exists()
