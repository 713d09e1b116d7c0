"""Command-centre destinations and which of them receive a facility's events.

A destination's scope is its jurisdiction: `central` receives everything, `province:<name>`
the facilities of that province, `team:<id>` the facilities that the area team covers.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from gateway.registry import Facility


class Destination(msgspec.Struct, kw_only=True, frozen=True):
    name: str
    url: str
    scope: str = "central"
    secret: str = ""
    bearer_token: str = ""
    timeout_s: float = 10.0
    ca_file: str = ""
    """PEM file of the CA that signed the centre's server certificate; empty uses the system CAs."""
    client_cert: str = ""
    """PEM client certificate (chain) for mutual TLS; empty sends no client certificate."""
    client_key: str = ""
    """PEM private key of `client_cert`; empty when the key is inside the certificate file."""
    max_in_flight: int = 8
    """Requests in flight at once to this destination, each for a different incident."""


def covers(destination: Destination, facility: Facility | None) -> bool:
    kind, _, value = destination.scope.partition(":")
    if kind == "central":
        return True
    if facility is None:
        return False
    if kind == "province":
        return facility.province == value
    if kind == "team":
        return facility.team == value
    return False


def select(destinations: Sequence[Destination], facility: Facility | None) -> list[str]:
    """Names of the destinations whose jurisdiction covers `facility`."""
    return [destination.name for destination in destinations if covers(destination, facility)]
