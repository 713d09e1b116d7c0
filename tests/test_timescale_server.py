"""Checks that scripts/timescaledb.sh gives tests a working TimescaleDB cluster."""

from __future__ import annotations

import psycopg
import pytest

from timescale_server import timescale_cluster

pytestmark = pytest.mark.timescaledb


def test_cluster_supports_hypertables(tmp_path):
    with timescale_cluster(tmp_path) as url:
        assert url.startswith("postgresql://gateway@127.0.0.1:")
        assert url.endswith("/gateway")

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION timescaledb")
            (license_name,) = conn.execute("SHOW timescaledb.license").fetchone()
            assert license_name in ("apache", "timescale")
            (telemetry,) = conn.execute("SHOW timescaledb.telemetry_level").fetchone()
            assert telemetry == "off"

            conn.execute("CREATE TABLE readings (ts timestamptz NOT NULL, value int)")
            conn.execute(
                "SELECT create_hypertable('readings', by_range('ts', INTERVAL '1 day'))"
            )
            conn.execute(
                "INSERT INTO readings "
                "SELECT t, 1 FROM generate_series("
                "now() - INTERVAL '10 days', now(), INTERVAL '1 hour') AS t"
            )
            dropped = conn.execute(
                "SELECT drop_chunks('readings', older_than => INTERVAL '3 days')"
            ).fetchall()
            assert len(dropped) >= 6
            (oldest,) = conn.execute(
                "SELECT min(ts) > now() - INTERVAL '5 days' FROM readings"
            ).fetchone()
            assert oldest is True

    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5).close()
    assert (tmp_path / "postgres.log").is_file()


def test_cluster_stops_when_body_raises(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with timescale_cluster(tmp_path) as url:
            1 / 0

    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5).close()
