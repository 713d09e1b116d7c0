"""Tests for event signatures and broker credentials, the latter also against real Mosquitto."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

from gateway import credentials, signing
from tests.mosquitto_server import BrokerInfo, mosquitto_broker

SECRET = "centre-secret"
BODY = b'{"event_id":"01a2","kind":"signal"}'
NOW = 1_740_816_000.0
HASH_FORMAT = re.compile(r"^\$7\$101\$([A-Za-z0-9+/]{16})\$([A-Za-z0-9+/]{86}==)$")
CLIENT_TIMEOUT_S = 10


def test_signed_headers_verify_round_trip():
    """Test that headers made by signed_headers verify against the same secret and body."""
    headers = signing.signed_headers(SECRET, BODY, now=NOW)

    reason = signing.verify(SECRET, headers[signing.TIMESTAMP_HEADER], BODY, headers[signing.SIGNATURE_HEADER], now=NOW)

    assert headers[signing.TIMESTAMP_HEADER] == str(int(NOW))
    assert re.fullmatch(r"[0-9a-f]{64}", headers[signing.SIGNATURE_HEADER])
    assert reason is None


def test_verify_changed_body_fails():
    """Test that a signature over one body does not verify another, with the reason."""
    headers = signing.signed_headers(SECRET, BODY, now=NOW)

    reason = signing.verify(SECRET, headers[signing.TIMESTAMP_HEADER], BODY + b" ", headers[signing.SIGNATURE_HEADER], now=NOW)

    assert reason == "signature does not match the body"


def test_verify_other_secret_fails():
    """Test that a signature made with another secret does not verify."""
    headers = signing.signed_headers("other-secret", BODY, now=NOW)

    reason = signing.verify(SECRET, headers[signing.TIMESTAMP_HEADER], BODY, headers[signing.SIGNATURE_HEADER], now=NOW)

    assert reason == "signature does not match the body"


def test_verify_changed_timestamp_fails():
    """Test that a valid signature replayed with another timestamp does not verify."""
    headers = signing.signed_headers(SECRET, BODY, now=NOW)

    reason = signing.verify(SECRET, str(int(NOW) + 1), BODY, headers[signing.SIGNATURE_HEADER], now=NOW)

    assert reason == "signature does not match the body"


@pytest.mark.parametrize("skew_s", [301, -301, 3600])
def test_verify_stale_timestamp_fails(skew_s: int):
    """Test that a timestamp more than 300 s from the receiver's clock fails with the reason."""
    headers = signing.signed_headers(SECRET, BODY, now=NOW)

    reason = signing.verify(SECRET, headers[signing.TIMESTAMP_HEADER], BODY, headers[signing.SIGNATURE_HEADER], now=NOW + skew_s)

    assert reason is not None
    assert "more than 300 s" in reason


def test_verify_timestamp_at_skew_limit_passes():
    """Test that a timestamp exactly 300 s old still verifies."""
    headers = signing.signed_headers(SECRET, BODY, now=NOW)

    reason = signing.verify(SECRET, headers[signing.TIMESTAMP_HEADER], BODY, headers[signing.SIGNATURE_HEADER], now=NOW + 300)

    assert reason is None


def test_verify_non_integer_timestamp_fails():
    """Test that a timestamp that is not an integer fails with a reason naming it."""
    reason = signing.verify(SECRET, "yesterday", BODY, "00" * 32, now=NOW)

    assert reason is not None
    assert "'yesterday'" in reason


def test_verify_password_right_and_wrong():
    """Test that a hash verifies its own password and no other."""
    encoded = credentials.hash_password("right")

    assert credentials.verify_password("right", encoded) is True
    assert credentials.verify_password("wrong", encoded) is False
    assert credentials.verify_password("", encoded) is False


def test_hash_password_matches_mosquitto_format():
    """Test that a hash reads `$7$101$<base64 of 12 bytes>$<base64 of 64 bytes>`."""
    encoded = credentials.hash_password("right")

    match = HASH_FORMAT.match(encoded)

    assert match is not None, encoded
    assert len(base64.b64decode(match.group(1))) == 12
    assert len(base64.b64decode(match.group(2))) == 64


def test_hash_password_salts_each_hash():
    """Test that two hashes of one password differ, and a fixed salt repeats the hash."""
    salt = b"\x01" * credentials.SALT_BYTES

    assert credentials.hash_password("right") != credentials.hash_password("right")
    assert credentials.hash_password("right", salt=salt) == credentials.hash_password("right", salt=salt)


@pytest.mark.parametrize("encoded", ["", "right", "$6$101$c2FsdA==$aGFzaA==", "$7$101$only-three-fields"])
def test_verify_password_malformed_hash(encoded: str):
    """Test that a hash in another or a broken format verifies nothing."""
    assert credentials.verify_password("right", encoded) is False


def test_password_file_skips_devices_without_hash():
    """Test that the password file has one line per user with a hash and skips empty hashes."""
    encoded = credentials.hash_password("right")

    text = credentials.password_file([("dev1", encoded), ("dev2", "")])

    assert text == f"dev1:{encoded}\n"


def test_generate_password_is_random():
    """Test that generated passwords are 24 URL-safe characters and differ."""
    first, second = credentials.generate_password(), credentials.generate_password()

    assert re.fullmatch(r"[A-Za-z0-9_-]{24}", first)
    assert first != second


def test_verify_password_reads_mosquitto_passwd_hash(tmp_path: Path):
    """Test that a hash written by Debian's mosquitto_passwd verifies with verify_password."""
    password_file = tmp_path / "passwd"
    password_file.write_text("")
    completed = subprocess.run(
        ["mosquitto_passwd", "-b", str(password_file), "dev1", "right"],
        capture_output=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")

    user, encoded = password_file.read_text().strip().split(":", 1)

    assert user == "dev1"
    assert credentials.verify_password("right", encoded) is True
    assert credentials.verify_password("wrong", encoded) is False


def publish(broker: BrokerInfo, password: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "dev1", "-P", password,
         "-q", "1", "-t", "pccc/v1/dev1/event", "-m", "{}"],
        capture_output=True,
        timeout=CLIENT_TIMEOUT_S,
    )


@pytest.mark.mosquitto
def test_password_file_accepted_by_mosquitto(tmp_path: Path):
    """Test that Mosquitto accepts dev1 with the password hashed by gateway.credentials and rejects a wrong one."""
    password_file = tmp_path / "passwd"
    password_file.write_text(credentials.password_file([("dev1", credentials.hash_password("right"))]))

    with mosquitto_broker(tmp_path, password_file=password_file, allow_anonymous=False) as broker:
        accepted = publish(broker, "right")
        rejected = publish(broker, "wrong")

    assert accepted.returncode == 0, accepted.stderr.decode(errors="replace")
    assert rejected.returncode != 0
    assert b"not authorised" in rejected.stderr
