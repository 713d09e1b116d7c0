"""Registry of facilities, their zones and the devices that report for them.

Technicians write it through the CLI; the daemon reads it through `RegistryCache`, which
keeps devices in memory and looks up unknown ids in the database again after a short time, so
a device registered while the gateway runs starts working without a restart.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
import time
from collections.abc import Iterable
from typing import Annotated

import msgspec

DeviceId = Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9_-]{3,64}\Z")]
FacilityId = Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9_.-]{1,64}\Z")]
Latitude = Annotated[float, msgspec.Meta(ge=-90, le=90)]
Longitude = Annotated[float, msgspec.Meta(ge=-180, le=180)]


class RegistryError(ValueError):
    """A registry entry is invalid or refers to something that does not exist."""


class Facility(msgspec.Struct, kw_only=True, frozen=True):
    id: FacilityId
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    address: str = ""
    commune: str = ""
    province: str = ""
    latitude: Latitude | None = None
    longitude: Longitude | None = None
    team: str = ""


class Device(msgspec.Struct, kw_only=True, frozen=True):
    id: DeviceId
    facility_id: str | None = None
    protocol: str = "mqtt"
    heartbeat_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 60
    window_s: Annotated[int, msgspec.Meta(ge=1, le=4 * 86400)] = 180
    test_mode: bool = False
    password_hash: str = ""


def add_facility(conn: sqlite3.Connection, facility: Facility, zones: dict[int, str] | None = None) -> None:
    """Insert or update a facility and, when given, replace its zone labels."""
    conn.execute(
        """INSERT INTO facilities (id, name, address, commune, province, latitude, longitude, team)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (id) DO UPDATE SET name = excluded.name, address = excluded.address,
               commune = excluded.commune, province = excluded.province, latitude = excluded.latitude,
               longitude = excluded.longitude, team = excluded.team""",
        (
            facility.id,
            facility.name,
            facility.address,
            facility.commune,
            facility.province,
            facility.latitude,
            facility.longitude,
            facility.team,
        ),
    )
    if zones is None:
        return
    conn.execute("DELETE FROM zones WHERE facility_id = ?", (facility.id,))
    conn.executemany(
        "INSERT INTO zones (facility_id, zone, label) VALUES (?, ?, ?)",
        [(facility.id, zone, label) for zone, label in sorted(zones.items())],
    )


ZONES_PATTERN = re.compile(r"^\s*(\d{1,4})\s*[:=]\s*(.+?)\s*$")


def parse_zones(text: str) -> dict[int, str]:
    """Parse `1:Tầng 1; 2:Kho` into {1: "Tầng 1", 2: "Kho"}."""
    zones: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        match = ZONES_PATTERN.match(item)
        if match is None:
            raise RegistryError(f"zone entry {item!r} must look like NUMBER:LABEL, e.g. 3:Tầng 3")
        zones[int(match.group(1))] = match.group(2)
    return zones


CSV_COLUMNS = ("id", "name", "address", "commune", "province", "latitude", "longitude", "team", "zones")


def read_facilities_csv(text: str) -> list[tuple[Facility, dict[int, str]]]:
    """Read facilities from CSV with a header row; raise `RegistryError` naming the line."""
    reader = csv.DictReader(io.StringIO(text))
    missing = {"id", "name"} - set(reader.fieldnames or ())
    if missing:
        raise RegistryError(f"CSV header lacks required columns: {', '.join(sorted(missing))}")
    unknown = set(reader.fieldnames or ()) - set(CSV_COLUMNS)
    if unknown:
        raise RegistryError(f"CSV header has unknown columns: {', '.join(sorted(unknown))}; allowed: {', '.join(CSV_COLUMNS)}")

    rows: list[tuple[Facility, dict[int, str]]] = []
    for line_number, row in enumerate(reader, start=2):
        try:
            facility = facility_from_fields(row)
            zones = parse_zones(row.get("zones") or "")
        except RegistryError as error:
            raise RegistryError(f"line {line_number}: {error}") from None
        rows.append((facility, zones))
    return rows


def facility_from_fields(fields: dict[str, str | None]) -> Facility:
    values: dict[str, object] = {key: (value or "").strip() for key, value in fields.items() if key != "zones"}
    for key in ("latitude", "longitude"):
        raw = values.get(key)
        if raw in ("", None):
            values[key] = None
            continue
        try:
            values[key] = float(str(raw))
        except ValueError:
            raise RegistryError(f"{key} {raw!r} is not a number") from None
    try:
        return msgspec.convert(values, Facility)
    except msgspec.ValidationError as error:
        raise RegistryError(f"facility is invalid: {error}") from None


def make_device(**fields: object) -> Device:
    """Build a `Device`, checking each field against its rule."""
    try:
        return msgspec.convert(fields, Device)
    except msgspec.ValidationError as error:
        raise RegistryError(f"device is invalid: {error}") from None


def add_device(conn: sqlite3.Connection, device: Device) -> None:
    if device.facility_id and get_facility(conn, device.facility_id) is None:
        raise RegistryError(f"facility {device.facility_id!r} does not exist; add it first with `gateway facility add`")
    conn.execute(
        """INSERT INTO devices (id, facility_id, protocol, heartbeat_s, window_s, test_mode, password_hash, created_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (id) DO UPDATE SET facility_id = excluded.facility_id, protocol = excluded.protocol,
               heartbeat_s = excluded.heartbeat_s, window_s = excluded.window_s, test_mode = excluded.test_mode,
               password_hash = CASE WHEN excluded.password_hash = '' THEN devices.password_hash
                                    ELSE excluded.password_hash END""",
        (
            device.id,
            device.facility_id or None,
            device.protocol,
            device.heartbeat_s,
            device.window_s,
            int(device.test_mode),
            device.password_hash,
            time.time(),
        ),
    )


def _device_from_row(row: tuple) -> Device:
    return Device(
        id=row[0],
        facility_id=row[1],
        protocol=row[2],
        heartbeat_s=row[3],
        window_s=row[4],
        test_mode=bool(row[5]),
        password_hash=row[6],
    )


_DEVICE_COLUMNS = "id, facility_id, protocol, heartbeat_s, window_s, test_mode, password_hash"


def get_device(conn: sqlite3.Connection, device_id: str) -> Device | None:
    row = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,)).fetchone()
    return _device_from_row(row) if row else None


def list_devices(conn: sqlite3.Connection) -> list[Device]:
    return [_device_from_row(row) for row in conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY id")]


def get_facility(conn: sqlite3.Connection, facility_id: str) -> Facility | None:
    row = conn.execute(
        "SELECT id, name, address, commune, province, latitude, longitude, team FROM facilities WHERE id = ?",
        (facility_id,),
    ).fetchone()
    if row is None:
        return None
    return Facility(
        id=row[0],
        name=row[1],
        address=row[2],
        commune=row[3],
        province=row[4],
        latitude=row[5],
        longitude=row[6],
        team=row[7],
    )


def zone_labels(conn: sqlite3.Connection, facility_id: str) -> dict[int, str]:
    return dict(conn.execute("SELECT zone, label FROM zones WHERE facility_id = ?", (facility_id,)).fetchall())


class RegistryCache:
    """In-memory view of the registry for the hot path."""

    MISS_RETRY_SECONDS = 5.0

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._devices: dict[str, Device] = {}
        self._facilities: dict[str, Facility] = {}
        self._zones: dict[str, dict[int, str]] = {}
        self._misses: dict[str, float] = {}

    def load(self) -> int:
        self._devices = {device.id: device for device in list_devices(self._conn)}
        facility_ids = {device.facility_id for device in self._devices.values() if device.facility_id}
        for facility_id in facility_ids:
            self._load_facility(facility_id)
        return len(self._devices)

    def _load_facility(self, facility_id: str) -> None:
        facility = get_facility(self._conn, facility_id)
        if facility is not None:
            self._facilities[facility_id] = facility
            self._zones[facility_id] = zone_labels(self._conn, facility_id)

    def device(self, device_id: str) -> Device | None:
        """Return the registered device, or None; unknown ids are looked up again after a few seconds."""
        device = self._devices.get(device_id)
        if device is not None:
            return device
        now = time.monotonic()
        if now - self._misses.get(device_id, -self.MISS_RETRY_SECONDS) < self.MISS_RETRY_SECONDS:
            return None
        device = get_device(self._conn, device_id)
        if device is None:
            self._misses[device_id] = now
            if len(self._misses) > 100_000:
                self._misses.clear()
            return None
        self._misses.pop(device_id, None)
        self._devices[device_id] = device
        if device.facility_id and device.facility_id not in self._facilities:
            self._load_facility(device.facility_id)
        return device

    def facility(self, facility_id: str) -> Facility | None:
        return self._facilities.get(facility_id)

    def zone_label(self, facility_id: str, zone: int) -> str:
        return self._zones.get(facility_id, {}).get(zone, "")

    def devices(self) -> Iterable[Device]:
        return self._devices.values()
