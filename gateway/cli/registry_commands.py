"""`gateway facility` and `gateway device`: the registry, for field technicians."""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gateway import credentials, journal, registry
from gateway.cli.console import console, fail
from gateway.i18n import _

facility_app = typer.Typer(help=_("Register facilities and their zones."), no_args_is_help=True)
device_app = typer.Typer(help=_("Register transmitter devices and issue their credentials."), no_args_is_help=True)

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="GATEWAY_DATA_DIR", help=_("Folder of the journal and registry."))]


def open_registry(data_dir: Path) -> sqlite3.Connection:
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = journal.connect(data_dir / "journal.db")
    journal.migrate(conn)
    return conn


@facility_app.command("add", help=_("Add or update a facility."))
def facility_add(
    facility_id: Annotated[str, typer.Option("--id", help=_("Facility id, e.g. HN-0001."))],
    name: Annotated[str, typer.Option("--name", help=_("Facility name."))],
    address: Annotated[str, typer.Option("--address")] = "",
    commune: Annotated[str, typer.Option("--commune", help=_("Commune or ward."))] = "",
    province: Annotated[str, typer.Option("--province")] = "",
    latitude: Annotated[float | None, typer.Option("--lat", help=_("Latitude in degrees."))] = None,
    longitude: Annotated[float | None, typer.Option("--lon", help=_("Longitude in degrees."))] = None,
    team: Annotated[str, typer.Option("--team", help=_("Area fire team that covers the facility."))] = "",
    zones: Annotated[str, typer.Option("--zones", help=_("Zone labels: 1:Tầng 1;2:Kho"))] = "",
    data_dir: DataDir = Path("var"),
) -> None:
    """Add or update a facility."""
    fields = {
        "id": facility_id,
        "name": name,
        "address": address,
        "commune": commune,
        "province": province,
        "latitude": "" if latitude is None else str(latitude),
        "longitude": "" if longitude is None else str(longitude),
        "team": team,
    }
    try:
        facility = registry.facility_from_fields(fields)
        zone_labels = registry.parse_zones(zones) if zones else None
    except registry.RegistryError as error:
        fail(str(error))
    with closing(open_registry(data_dir)) as conn:
        with conn:
            conn.execute("BEGIN")
            registry.add_facility(conn, facility, zone_labels)
    console.print(_("Facility {id} saved.").format(id=facility.id))


@facility_app.command("import", help=_("Import facilities from a CSV file; nothing is saved if any line is invalid."))
def facility_import(
    csv_file: Annotated[Path, typer.Argument(help=_("CSV with columns id,name,address,commune,province,latitude,longitude,team,zones."))],
    data_dir: DataDir = Path("var"),
) -> None:
    """Import facilities from a CSV file; nothing is saved if any line is invalid."""
    try:
        text = csv_file.read_text(encoding="utf-8-sig")
    except OSError as error:
        fail(_("Cannot read {path}: {error}").format(path=csv_file, error=error.strerror))
    try:
        rows = registry.read_facilities_csv(text)
    except registry.RegistryError as error:
        fail(f"{csv_file}: {error}")
    with closing(open_registry(data_dir)) as conn:
        with conn:
            conn.execute("BEGIN")
            for facility, zone_labels in rows:
                registry.add_facility(conn, facility, zone_labels or None)
    console.print(_("{count} facilities imported.").format(count=len(rows)))


@facility_app.command("list", help=_("List registered facilities with their zones and devices."))
def facility_list(data_dir: DataDir = Path("var")) -> None:
    with closing(open_registry(data_dir)) as conn:
        rows = conn.execute(
            """SELECT f.id, f.name, f.commune, f.province, f.team,
                      (SELECT COUNT(*) FROM zones z WHERE z.facility_id = f.id),
                      (SELECT COUNT(*) FROM devices d WHERE d.facility_id = f.id)
               FROM facilities f ORDER BY f.id"""
        ).fetchall()
    table = Table(_("Facility"), _("Name"), _("Commune"), _("Province"), _("Team"), _("Zones"), _("Devices"))
    for row in rows:
        table.add_row(*(str(value) for value in row))
    console.print(table)


@device_app.command("add", help=_("Register a device and print its broker credentials."))
def device_add(
    device_id: Annotated[str, typer.Argument(help=_("Device id, also its MQTT user name: 3-64 of A-Z a-z 0-9 _ -"))],
    facility_id: Annotated[str, typer.Option("--facility", help=_("Facility the device reports for."))] = "",
    heartbeat_s: Annotated[int, typer.Option("--heartbeat", help=_("Expected heartbeat interval in seconds."))] = 60,
    window_s: Annotated[int, typer.Option("--window", help=_("Seconds of silence before communication loss."))] = 180,
    test_mode: Annotated[bool, typer.Option("--test-mode", help=_("Mark the device's signals as tests."))] = False,
    password: Annotated[str | None, typer.Option("--password", help=_("Broker password; a random one is generated when omitted."))] = None,
    data_dir: DataDir = Path("var"),
) -> None:
    """Register a device and print its broker credentials."""
    secret = password or credentials.generate_password()
    try:
        device = registry.make_device(
            id=device_id,
            facility_id=facility_id or None,
            heartbeat_s=heartbeat_s,
            window_s=window_s,
            test_mode=test_mode,
            password_hash=credentials.hash_password(secret),
        )
        with closing(open_registry(data_dir)) as conn:
            with conn:
                conn.execute("BEGIN")
                registry.add_device(conn, device)
    except registry.RegistryError as error:
        fail(str(error))
    console.print(_("Device {id} registered.").format(id=device.id))
    if not device.facility_id:
        console.print(
            "[bold yellow]"
            + _("Warning: the device is not bound to a facility; its alarms reach the command centre without an address. Bind it with --facility.")
            + "[/]"
        )
    console.print(_("MQTT user name: {user}").format(user=device.id))
    console.print(_("MQTT password: {password}").format(password=secret))


@device_app.command("list", help=_("List registered devices."))
def device_list(data_dir: DataDir = Path("var")) -> None:
    """List registered devices."""
    with closing(open_registry(data_dir)) as conn:
        devices = registry.list_devices(conn)
    table = Table(_("Device"), _("Facility"), _("Protocol"), _("Heartbeat (s)"), _("Window (s)"), _("Test mode"))
    for device in devices:
        table.add_row(device.id, device.facility_id or "-", device.protocol, str(device.heartbeat_s), str(device.window_s), _("yes") if device.test_mode else _("no"))
    console.print(table)


@device_app.command("passwd", help=_("Write Mosquitto's password file (and ACL) for all registered devices."))
def device_passwd(
    password_file: Annotated[Path, typer.Option("--password-file", help=_("Mosquitto password file to write."))],
    acl_file: Annotated[Path | None, typer.Option("--acl-file", help=_("Mosquitto ACL file to write."))] = None,
    gateway_user: Annotated[str, typer.Option("--gateway-user", help=_("Broker user of the gateway itself."))] = "gateway",
    gateway_password: Annotated[str | None, typer.Option("--gateway-password", envvar="GATEWAY_MQTT_PASSWORD", help=_("Broker password of the gateway itself."))] = None,
    data_dir: DataDir = Path("var"),
) -> None:
    """Write Mosquitto's password file (and ACL) for all registered devices."""
    with closing(open_registry(data_dir)) as conn:
        entries = [(device.id, device.password_hash) for device in registry.list_devices(conn)]
    if gateway_password:
        entries.append((gateway_user, credentials.hash_password(gateway_password)))
    password_file.write_text(credentials.password_file(entries), encoding="utf-8")
    password_file.chmod(0o600)
    if acl_file is not None:
        acl_file.write_text(credentials.acl_file(gateway_user), encoding="utf-8")
    console.print(_("{count} credentials written to {path}.").format(count=len(entries), path=password_file))


@device_app.command("status", help=_("Show whether devices are online, with their last heartbeat, from the running gateway."))
def device_status(
    device_id: Annotated[str | None, typer.Argument(help=_("Device id; all devices when omitted."))] = None,
    http: Annotated[str, typer.Option("--http", help=_("HOST:PORT of the running gateway's local API."))] = "127.0.0.1:8780",
    as_json: Annotated[bool, typer.Option("--json", help=_("Print JSON instead of a table."))] = False,
) -> None:
    query = f"?{urllib.parse.urlencode({'id': device_id})}" if device_id else ""
    try:
        with urllib.request.urlopen(f"http://{http}/v1/devices/status{query}", timeout=10) as response:
            states = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("error", error.reason)
        fail(_("The gateway rejected the request: {detail}").format(detail=detail))
    except OSError as error:
        fail(_("Cannot reach the gateway at {http}: {error}").format(http=http, error=error))
    if as_json:
        console.print_json(data=states)
        return

    table = Table(_("Device"), _("State"), _("Last heard"), _("Battery (V)"), _("Mains"), _("Signal (dBm)"), _("Link"), _("Open troubles"))
    for state in states:
        heartbeat = state.get("last_heartbeat") or {}
        mains = heartbeat.get("mains")
        if mains is None:
            mains_text = "-"
        else:
            mains_text = _("yes") if mains else _("no")
        table.add_row(
            state["device_id"],
            _("online") if state["online"] else _("offline"),
            _("{seconds:.0f} s ago").format(seconds=state["silent_s"]) if state.get("last_seen") else _("never"),
            "-" if heartbeat.get("battery_v") is None else f"{heartbeat['battery_v']:.1f}",
            mains_text,
            "-" if heartbeat.get("rssi") is None else str(heartbeat["rssi"]),
            heartbeat.get("link") or "-",
            ", ".join(state.get("raised") or ()) or "-",
        )
    console.print(table)
