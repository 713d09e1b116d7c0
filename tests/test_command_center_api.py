"""The published command-centre API (docs/command-center-api.yaml) against the code.

The spec is checked with openapi-spec-validator, its event schema is compared field by field
with gateway/event_body.py, and real request and response pairs between the forwarder and the
simulator are validated against it with openapi-core.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import msgspec
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

from gateway import event_body
from gateway.incidents import INCIDENT_CLASSES, IncidentState
from gateway.signal import EventClass, Qualifier, Source
from simulators.command_center import CommandCenter, Exchange
from tests.conftest import SECRET
from tests.forwarding_rig import FACILITIES, ForwardingRig, destination

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "command-center-api.yaml"
SCHEMA_NAMES = {
    "EventBody": "Event",
    "IncidentBody": "Incident",
    "FacilityBody": "Facility",
    "DeviceBody": "Device",
    "SignalBody": "Signal",
    "TimesBody": "Times",
}


@pytest.fixture(scope="module")
def spec() -> dict:
    document, _ = read_from_filename(str(SPEC_PATH))
    return document


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC_PATH))


def test_api_spec_is_valid_openapi_31(spec):
    """Test that the spec is a valid OpenAPI 3.1 document."""
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    assert list(spec["paths"]) == ["/v1/events"]


def code_shape(info: msgspec.inspect.Type) -> tuple[frozenset[str], str | None, str | None]:
    """(JSON types, format, schema name) of a msgspec field type."""
    if isinstance(info, msgspec.inspect.UnionType):
        shapes = [code_shape(member) for member in info.types]
        types = frozenset().union(*(shape[0] for shape in shapes))
        formats = {shape[1] for shape in shapes} - {None}
        names = {shape[2] for shape in shapes} - {None}
        return types, next(iter(formats), None), next(iter(names), None)
    simple = {
        msgspec.inspect.StrType: ("string", None),
        msgspec.inspect.IntType: ("integer", None),
        msgspec.inspect.FloatType: ("number", None),
        msgspec.inspect.BoolType: ("boolean", None),
        msgspec.inspect.DateTimeType: ("string", "date-time"),
        msgspec.inspect.NoneType: ("null", None),
    }
    if isinstance(info, msgspec.inspect.StructType):
        return frozenset({"object"}), None, SCHEMA_NAMES[info.cls.__name__]
    json_type, json_format = simple[type(info)]
    return frozenset({json_type}), json_format, None


def spec_shape(schema: dict) -> tuple[frozenset[str], str | None, str | None]:
    """(JSON types, format, schema name) of a property schema in the spec."""
    if "$ref" in schema:
        return frozenset({"object"}), None, schema["$ref"].rsplit("/", 1)[1]
    if "oneOf" in schema:
        shapes = [spec_shape(member) for member in schema["oneOf"]]
        types = frozenset().union(*(shape[0] for shape in shapes))
        names = {shape[2] for shape in shapes} - {None}
        return types, None, next(iter(names), None)
    types = schema["type"]
    return frozenset(types if isinstance(types, list) else [types]), schema.get("format"), None


@pytest.mark.parametrize("struct", [event_body.EventBody, *[getattr(event_body, name) for name in SCHEMA_NAMES if name != "EventBody"]])
def test_api_schema_matches_event_body(spec, struct):
    """Test that each body struct and its spec schema have the same fields, types, formats and nullability."""
    schema = spec["components"]["schemas"][SCHEMA_NAMES[struct.__name__]]
    info = msgspec.inspect.type_info(struct)

    fields = {field.encode_name: field.type for field in info.fields}
    assert list(schema["properties"]) == list(fields)
    # The encoder writes every field, defaults included, so every property is always present.
    assert sorted(schema["required"]) == sorted(fields)
    assert schema["additionalProperties"] is False
    for name, field_type in fields.items():
        assert spec_shape(schema["properties"][name]) == code_shape(field_type), f"{struct.__name__}.{name}"


def test_api_enums_match_gateway_values(spec):
    """Test that the enums in the spec list exactly the values the gateway produces."""
    schemas = spec["components"]["schemas"]
    assert schemas["Event"]["properties"]["kind"]["enum"] == ["signal", "incident_update"]
    assert schemas["Incident"]["properties"]["state"]["enum"] == [state.value for state in IncidentState]
    assert schemas["Incident"]["properties"]["event_class"]["enum"] == [event_class.value for event_class in INCIDENT_CLASSES]
    assert schemas["Signal"]["properties"]["event_class"]["enum"] == [event_class.value for event_class in EventClass]
    assert schemas["Signal"]["properties"]["qualifier"]["enum"] == [qualifier.value for qualifier in Qualifier]
    # An incident update carries no source.
    assert schemas["Device"]["properties"]["source"]["enum"] == [source.value for source in Source] + [""]


def request_of(centre: CommandCenter, exchange: Exchange) -> MockRequest:
    return MockRequest(
        centre.url, "post", "/v1/events", headers=exchange.headers, data=exchange.body, content_type=exchange.headers["Content-Type"]
    )


def response_of(exchange: Exchange) -> MockResponse:
    content_type = exchange.response_headers["Content-Type"].split(";")[0]
    return MockResponse(exchange.response_body, status_code=exchange.status, headers=exchange.response_headers, content_type=content_type)


async def test_api_real_exchanges_follow_spec(tmp_path, openapi):
    """Test that every request the forwarder sent and every response the simulator gave validates against the spec."""
    centre = CommandCenter(secret=SECRET, record_exchanges=True)
    await centre.start()
    rig = ForwardingRig(
        tmp_path,
        [
            destination("central", centre.url, bearer_token="token-central"),
            destination("wrong-secret", centre.url, secret="not-the-secret"),
        ],
    )
    await rig.start()
    try:
        first = await rig.alarm(FACILITIES[0].id, zone=1)
        await rig.wait_until(lambda: rig.outbox(first.id, "wrong-secret")["state"] == "dead", 10, "401 dead letter")
        await centre.wait_for(lambda events: len(events) >= 1, timeout=10)

        centre.set_mode("fail_next", count=1, status=429)
        restore = await rig.alarm(FACILITIES[0].id, zone=1, qualifier=Qualifier.RESTORE)
        await rig.wait_until(lambda: rig.outbox(restore.id, "central")["state"] == "delivered", 10, "restore delivered")

        centre.set_mode("fail_next", count=2)
        centre.set_mode("duplicate_confirm")
        trouble = await rig.alarm(FACILITIES[1].id, code="301", event_class=EventClass.TROUBLE)
        await rig.wait_until(lambda: rig.outbox(trouble.id, "central")["state"] == "delivered", 10, "409 delivery")

        centre.set_mode("normal")
        incident_id = rig.query("SELECT incident_id FROM outbox WHERE event_id = ?", first.id)[0][0]
        update = rig.engine.change_state(incident_id, IncidentState.ACKNOWLEDGED, at=dt.datetime.now(dt.timezone.utc), actor="officer-1")
        await rig.journal.write(update)
        rig.forwarder.wake()
        await centre.wait_for(lambda events: any(entry["event"]["kind"] == "incident_update" for entry in events), timeout=10)

        rejected = await rig.alarm(FACILITIES[2].id, code="200", event_class=EventClass.SUPERVISORY, signal_id="evt-reject-1")
        centre.set_mode("reject_event", event_id=rejected.id)
        centre.set_mode("down")
        await rig.wait_until(lambda: centre.status_counts[503] >= 1, 10, "a 503")
        centre.set_mode("normal")
        centre.set_mode("reject_event", event_id=rejected.id)
        await rig.wait_until(lambda: rig.outbox(rejected.id, "central")["state"] == "dead", 20, "400 dead letter")
    finally:
        await rig.stop()
        await centre.stop()

    assert centre.exchanges is not None
    statuses = {exchange.status for exchange in centre.exchanges}
    assert {201, 409, 400, 401, 429, 500, 503} <= statuses
    for exchange in centre.exchanges:
        openapi.validate_request(request_of(centre, exchange))
        openapi.validate_response(request_of(centre, exchange), response_of(exchange))
    kinds = {json.loads(exchange.body)["kind"] for exchange in centre.exchanges}
    assert kinds == {"signal", "incident_update"}


async def test_api_validation_rejects_wrong_body(tmp_path, openapi):
    """Test that the validation used above fails on a body that breaks the spec, so it can catch a drift."""
    centre = CommandCenter(secret=SECRET, record_exchanges=True)
    await centre.start()
    rig = ForwardingRig(tmp_path, [destination("central", centre.url)])
    await rig.start()
    try:
        await rig.alarm(FACILITIES[0].id)
        await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
    finally:
        await rig.stop()
        await centre.stop()

    exchange = centre.exchanges[0]
    body = json.loads(exchange.body)
    cases = {
        "date-time": {**body, "times": {**body["times"], "received": "yesterday"}},
        "nullability": {**body, "facility": None},
        "extra field": {**body, "priority": 1},
        "missing field": {key: value for key, value in body.items() if key != "test"},
        "enum": {**body, "kind": "alarm"},
    }
    for case, changed in cases.items():
        broken = Exchange(exchange.headers, json.dumps(changed).encode(), exchange.status, exchange.response_headers, exchange.response_body)
        with pytest.raises(Exception) as raised:
            openapi.validate_request(request_of(centre, broken))
        assert "validation" in str(raised.value).lower(), case
    missing_key = {key: value for key, value in exchange.headers.items() if key.lower() != "idempotency-key"}
    with pytest.raises(Exception, match="Idempotency-Key"):
        openapi.validate_request(request_of(centre, Exchange(missing_key, exchange.body, 201, {}, b"")))
