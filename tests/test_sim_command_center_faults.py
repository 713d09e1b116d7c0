"""The command centre simulator's added fault modes, TLS and exchange recording, over real HTTP."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
import trustme

from gateway.signing import IDEMPOTENCY_HEADER, signed_headers
from simulators.command_center import CommandCenter, server_tls_context
from tests.test_sim_command_center import make_body

SECRET = "test-secret"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=5)


async def post(session: aiohttp.ClientSession, url: str, event_id: str) -> int:
    body = make_body(event_id)
    headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: event_id, **signed_headers(SECRET, body)}
    async with session.post(f"{url}/v1/events", data=body, headers=headers) as response:
        return response.status


@pytest.fixture
async def centre():
    server = CommandCenter(secret=SECRET, record_exchanges=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as client:
        yield client


async def test_command_center_fail_event_returns_500_until_cleared(centre, session):
    """Test that fail_event responds 500 to every attempt of that event only, until normal."""
    centre.set_mode("fail_event", event_id="evt-stuck")

    assert await post(session, centre.url, "evt-stuck") == 500
    assert await post(session, centre.url, "evt-other") == 201
    assert await post(session, centre.url, "evt-stuck") == 500
    centre.set_mode("normal")
    assert await post(session, centre.url, "evt-stuck") == 201
    assert [entry["idempotency_key"] for entry in centre.events] == ["evt-other", "evt-stuck"]


async def test_command_center_fail_next_with_status(centre, session):
    """Test that fail_next responds with the chosen retryable status, then records again."""
    async with session.post(f"{centre.url}/control", json={"mode": "fail_next", "count": 1, "status": 429}) as response:
        assert response.status == 200
        assert (await response.json())["fail_status"] == 429

    assert await post(session, centre.url, "evt-1") == 429
    assert await post(session, centre.url, "evt-1") == 201


@pytest.mark.parametrize("status", [200, 404, 409, 600])
async def test_command_center_fail_next_rejects_other_status(centre, status):
    """Test that fail_next refuses a status the gateway would not retry."""
    with pytest.raises(ValueError, match="fail_next status"):
        centre.set_mode("fail_next", count=1, status=status)


async def test_command_center_records_exchanges(centre, session):
    """Test that record_exchanges keeps each request with the response the server sent."""
    centre.set_mode("fail_next", count=1)
    await post(session, centre.url, "evt-1")
    await post(session, centre.url, "evt-1")
    await post(session, centre.url, "evt-1")

    assert centre.exchanges is not None
    assert [exchange.status for exchange in centre.exchanges] == [500, 201, 409]
    assert centre.exchanges[1].headers[IDEMPOTENCY_HEADER] == "evt-1"
    assert centre.exchanges[1].body == make_body("evt-1")
    assert centre.exchanges[1].response_body == b'{"status": "recorded"}'
    assert centre.exchanges[1].response_headers["Content-Type"].startswith("application/json")


async def test_command_center_restart_keeps_port_and_events(centre, session):
    """Test that stop and start serve the same URL again with the events recorded before."""
    url = centre.url
    assert await post(session, url, "evt-1") == 201
    await centre.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, url, "evt-2")

    await centre.start()
    assert centre.url == url
    assert await post(session, url, "evt-2") == 201
    assert [entry["idempotency_key"] for entry in centre.events] == ["evt-1", "evt-2"]


async def test_command_center_tls_requires_client_certificate(tmp_path, session):
    """Test that with a client CA the simulator serves HTTPS only to clients with a certificate it signed."""
    authority = trustme.CA()
    other_authority = trustme.CA()
    server_file = tmp_path / "server.pem"
    ca_file = tmp_path / "ca.pem"
    authority.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_file))
    authority.cert_pem.write_to_path(str(ca_file))
    centre = CommandCenter(secret=SECRET, ssl_context=server_tls_context(server_file, server_file, client_ca_file=ca_file))
    await centre.start()
    try:
        assert centre.url.startswith("https://")
        results = {}
        for name, issuer in (("trusted", authority), ("untrusted", other_authority), ("none", None)):
            context = ssl.create_default_context(cafile=str(ca_file))
            if issuer is not None:
                client_file = tmp_path / f"{name}.pem"
                issuer.issue_cert("gateway.client.invalid").private_key_and_cert_chain_pem.write_to_path(str(client_file))
                context.load_cert_chain(str(client_file))
            connector = aiohttp.TCPConnector(ssl=context)
            async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as client:
                try:
                    results[name] = await post(client, centre.url, f"evt-{name}")
                except aiohttp.ClientError as error:
                    results[name] = type(error).__name__
    finally:
        await centre.stop()

    assert results["trusted"] == 201
    assert results["untrusted"] != 201
    assert results["none"] != 201
    assert [entry["idempotency_key"] for entry in centre.events] == ["evt-trusted"]
