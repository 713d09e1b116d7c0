"""Tests for configuration loading: defaults, rejected keys and values, TOML errors, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config
from gateway.config import Config, ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "gateway.example.toml"

DESTINATION = '[[destinations]]\nname = "c07"\nurl = "http://127.0.0.1:8790"\n'

# (case, TOML text, key, shown value, words of the rule)
BAD_VALUES = [
    ("mqtt_url_http", '[mqtt]\nurl = "http://x"\n', "mqtt.url", "'http://x'", "must be `embedded` or a URL like mqtt://"),
    ("mqtt_url_no_host", '[mqtt]\nurl = "mqtt://"\n', "mqtt.url", "'mqtt://'", "must be `embedded` or a URL like mqtt://"),
    ("mqtt_keepalive_low", "[mqtt]\nkeepalive_s = 1\n", "mqtt.keepalive_s", "1", "greater than or equal to 5"),
    ("http_listen_no_port", '[http]\nlisten = "nohost"\n', "http.listen", "'nohost'", "must be HOST:PORT"),
    ("gateway_language_fr", '[gateway]\nlanguage = "fr"\n', "gateway.language", "'fr'", "'vi' or 'en'"),
    ("embedded_port_high", "[embedded_broker]\nport = 70000\n", "embedded_broker.port", "70000", "less than or equal to 65535"),
    (
        "destination_scope_planet",
        DESTINATION + 'scope = "planet:x"\n',
        "destinations.0.scope",
        "'planet:x'",
        "must be `central`, `province:<province name>` or `team:<team id>`",
    ),
    (
        "destination_url_ftp",
        '[[destinations]]\nname = "c07"\nurl = "ftp://127.0.0.1"\n',
        "destinations.0.url",
        "'ftp://127.0.0.1'",
        "must be an http:// or https:// base URL",
    ),
    (
        "destination_name_space",
        '[[destinations]]\nname = "c 07"\nurl = "http://127.0.0.1:8790"\n',
        "destinations.0.name",
        "'c 07'",
        "should match pattern",
    ),
]


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_without_file_gives_defaults():
    """Test that no config file gives the embedded defaults."""
    settings = config.load(None)

    assert settings.mqtt.url == "embedded"
    assert settings.gateway.data_dir == Path("var")
    assert settings.gateway.language == "vi"
    assert settings.gateway.journal_synchronous == "FULL"
    assert settings.http.listen == "127.0.0.1:8780"
    assert settings.destinations == []
    assert settings.incidents.trouble_holdoff_s == 60.0


def test_load_empty_file_gives_defaults(tmp_path: Path):
    """Test that a file with only comments gives the same settings as no file."""
    path = write(tmp_path, "# nothing set yet\n")

    assert config.load(path) == Config()


def test_load_unknown_key_named(tmp_path: Path):
    """Test that an unknown key stops loading with a message naming the key and the file."""
    path = write(tmp_path, '[mqtt]\nurll = "mqtt://127.0.0.1:1883"\n')

    with pytest.raises(ConfigError) as excinfo:
        config.load(path)

    message = str(excinfo.value)
    assert "mqtt.urll" in message
    assert "unknown key" in message
    assert str(path) in message


def test_load_unknown_section_named(tmp_path: Path):
    """Test that an unknown top-level section is named in the message."""
    path = write(tmp_path, "[mqttt]\nurl = \"embedded\"\n")

    with pytest.raises(ConfigError) as excinfo:
        config.load(path)

    assert "mqttt: unknown key" in str(excinfo.value)


@pytest.mark.parametrize(("text", "key", "value", "rule"), [case[1:] for case in BAD_VALUES], ids=[case[0] for case in BAD_VALUES])
def test_load_bad_value_named(tmp_path: Path, text: str, key: str, value: str, rule: str):
    """Test that a wrong value stops loading with a message naming the key, the value and the rule."""
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as excinfo:
        config.load(path)

    message = str(excinfo.value)
    assert f"{key} = {value}" in message
    assert rule in message
    assert str(path) in message


def test_load_duplicate_destination_names(tmp_path: Path):
    """Test that two destinations with one name are rejected with the repeated name."""
    path = write(tmp_path, DESTINATION + DESTINATION.replace("8790", "8791"))

    with pytest.raises(ConfigError) as excinfo:
        config.load(path)

    message = str(excinfo.value)
    assert "destination names must be unique" in message
    assert "repeated: c07" in message


def test_load_reports_every_bad_key(tmp_path: Path):
    """Test that one message lists every wrong key, not only the first."""
    path = write(tmp_path, '[mqtt]\nurl = "http://x"\nurll = "y"\n[http]\nlisten = "nohost"\n')

    with pytest.raises(ConfigError) as excinfo:
        config.load(path)

    message = str(excinfo.value)
    assert "mqtt.url = 'http://x'" in message
    assert "mqtt.urll" in message
    assert "http.listen = 'nohost'" in message


def test_load_invalid_toml_names_file(tmp_path: Path):
    """Test that a file that is not valid TOML gives a message with the file name."""
    path = write(tmp_path, '[mqtt\nurl = "embedded"\n', name="broken.toml")

    with pytest.raises(ConfigError) as excinfo:
        config.load(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert "not valid TOML" in message


def test_load_missing_file_names_file(tmp_path: Path):
    """Test that a config path that does not exist gives a message with the path."""
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as excinfo:
        config.load(path)

    assert str(path) in str(excinfo.value)


def test_load_example_file_validates():
    """Test that the shipped example configuration loads without errors."""
    settings = config.load(EXAMPLE)

    assert isinstance(settings, Config)
    assert settings.destinations
    assert len({destination.name for destination in settings.destinations}) == len(settings.destinations)


def test_with_overrides_applies_flags(tmp_path: Path):
    """Test that --mqtt, --forward, --forward-secret and --data-dir replace the file's values."""
    base = config.load(write(tmp_path, '[mqtt]\nurl = "mqtt://broker.local:1883"\n'))

    settings = config.with_overrides(
        base,
        mqtt_url="mqtt://127.0.0.1:18830",
        forward_url="http://127.0.0.1:8790",
        forward_secret="s3cret",
        data_dir=tmp_path / "data",
    )

    assert settings.mqtt.url == "mqtt://127.0.0.1:18830"
    assert settings.gateway.data_dir == tmp_path / "data"
    assert [(item.name, item.url, item.scope, item.secret) for item in settings.destinations] == [
        ("central", "http://127.0.0.1:8790", "central", "s3cret"),
    ]
    assert base.mqtt.url == "mqtt://broker.local:1883"


def test_with_overrides_keeps_other_destinations(tmp_path: Path):
    """Test that --forward replaces the destination named central and keeps the others."""
    text = (
        '[[destinations]]\nname = "central"\nurl = "http://old.example:1"\n'
        '[[destinations]]\nname = "pc07-hanoi"\nurl = "http://127.0.0.1:8791"\nscope = "province:Hà Nội"\n'
    )
    base = config.load(write(tmp_path, text))

    settings = config.with_overrides(base, forward_url="http://127.0.0.1:8790")

    assert [(item.name, item.url) for item in settings.destinations] == [
        ("central", "http://127.0.0.1:8790"),
        ("pc07-hanoi", "http://127.0.0.1:8791"),
    ]


def test_with_overrides_without_flags_changes_nothing():
    """Test that no flags give back the same settings."""
    base = Config()

    assert config.with_overrides(base) == base


def test_with_overrides_bad_flag_names_source():
    """Test that a wrong flag value is rejected and the message blames the command-line flags."""
    with pytest.raises(ConfigError) as excinfo:
        config.with_overrides(Config(), mqtt_url="http://x")

    message = str(excinfo.value)
    assert "command-line flags" in message
    assert "mqtt.url = 'http://x'" in message
