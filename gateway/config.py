"""Gateway configuration: TOML, validated at start-up.

Every key is documented in config/gateway.example.toml. An unknown key or a wrong value stops
start-up with a message that names the file, the key, the value and the rule it broke.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key, the value and the rule."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(Section):
    data_dir: Path = Path("var")
    language: Literal["vi", "en"] = "vi"
    journal_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    startup_grace_s: Annotated[float, Field(ge=0, le=3600)] = 120.0


class MqttSection(Section):
    url: str = "embedded"
    username: str = ""
    password: str = ""
    client_id: Annotated[str, Field(min_length=1, max_length=64)] = "pccc-gateway"
    keepalive_s: Annotated[int, Field(ge=5, le=600)] = 30
    shared_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]*$")] = ""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value == "embedded":
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must be `embedded` or a URL like mqtt://127.0.0.1:1883")
        return value


class EmbeddedBrokerSection(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 1883


class HttpSection(Section):
    listen: str = "127.0.0.1:8780"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if not re.fullmatch(r"[^:\s]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", value):
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8780")
        return value

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


class DestinationSection(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    url: str
    scope: str = "central"
    secret: str = ""
    bearer_token: str = ""
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    max_in_flight: Annotated[int, Field(ge=1, le=64)] = 8

    @field_validator("ca_file", "client_cert", "client_key")
    @classmethod
    def _check_file(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError("must name a readable PEM file")
        return value

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> DestinationSection:
        if self.client_key and not self.client_cert:
            raise ValueError(f"destination {self.name}: client_key is set without client_cert")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// base URL of the command-centre API")
        return value

    @field_validator("scope")
    @classmethod
    def _check_scope(cls, value: str) -> str:
        if value == "central" or re.fullmatch(r"(province|team):.+", value):
            return value
        raise ValueError("must be `central`, `province:<province name>` or `team:<team id>`")


class StoreSection(Section):
    url: str = ""
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 90

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be empty (the embedded store) or a postgresql:// URL of TimescaleDB")
        return value


class IncidentsSection(Section):
    trouble_holdoff_s: Annotated[float, Field(ge=0, le=86400)] = 60.0


class Config(Section):
    gateway: GatewaySection = GatewaySection()
    mqtt: MqttSection = MqttSection()
    embedded_broker: EmbeddedBrokerSection = EmbeddedBrokerSection()
    http: HttpSection = HttpSection()
    destinations: list[DestinationSection] = []
    incidents: IncidentsSection = IncidentsSection()
    store: StoreSection = StoreSection()

    @model_validator(mode="after")
    def _unique_destinations(self) -> Config:
        names = [destination.name for destination in self.destinations]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(duplicates)}")
        return self


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {location}: unknown key; see config/gateway.example.toml for the keys that exist")
            continue
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {location}{shown}: {message}")
    return "\n".join(lines)


def parse(data: dict, source: str = "<defaults>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load(path: Path | None) -> Config:
    """Read and validate a TOML config; no path gives the embedded defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration {path} is not valid TOML: {error}") from None
    return parse(data, str(path))


def with_overrides(config: Config, *, mqtt_url: str | None = None, forward_url: str | None = None,
                   forward_secret: str | None = None, data_dir: Path | None = None, http_listen: str | None = None,
                   store_url: str | None = None) -> Config:
    """Apply command-line flags on top of the file; the result is validated again."""
    data = config.model_dump(mode="python")
    if mqtt_url is not None:
        data["mqtt"]["url"] = mqtt_url
    if data_dir is not None:
        data["gateway"]["data_dir"] = data_dir
    if http_listen is not None:
        data["http"]["listen"] = http_listen
    if store_url is not None:
        data["store"]["url"] = store_url
    if forward_url is not None:
        others = [item for item in data["destinations"] if item["name"] != "central"]
        central = {"name": "central", "url": forward_url, "scope": "central", "secret": forward_secret or ""}
        data["destinations"] = [central, *others]
    return parse(data, "command-line flags")
