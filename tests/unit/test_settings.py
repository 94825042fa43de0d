"""Settings that are refused at start, with the reason, rather than misbehaving later."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.settings import Settings, settings_error


@pytest.mark.parametrize(
    "url", ["https://user:secret@gw.example.com", "https://token@gw.example.com/", "gw.example"]
)
def test_a_public_url_with_credentials_or_no_scheme_is_refused(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It is printed at start, on the landing page, and in every result URL.
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", url)
    with pytest.raises(ValidationError, match="GATEWAY_PUBLIC_URL"):
        Settings()


def test_a_plain_public_url_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", "https://gw.example.com/base")
    assert Settings().public_url == "https://gw.example.com/base"


# ---------------------------------------------------------------- the YAML config is strict

CONFIG = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"
NAMED_KEY = {"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}


def _shipped() -> dict[str, Any]:
    config = yaml.safe_load(CONFIG.read_text())
    config["clients"]["keys"] = {"team-a": dict(NAMED_KEY)}  # a level the shipped file lacks
    return config


def _mappings(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every mapping in the config, by its path: each is a level an unknown key may sit at."""
    if isinstance(node, dict):
        yield path
        for key, value in node.items():
            yield from _mappings(value, (*path, str(key)))


def _levels() -> list[tuple[str, ...]]:
    # A mapping keyed by names (providers, clients.keys) takes new names, not unknown keys:
    # its entries are the levels.
    return [p for p in _mappings(_shipped()) if p not in (("providers",), ("clients", "keys"))]


def test_the_shipped_config_and_every_level_are_checked() -> None:
    assert GatewayConfig.model_validate(_shipped())
    levels = {".".join(p) for p in _levels()}
    for level in ("", "routing.hedge", "providers.fal", "providers.replicate.input"):
        assert level in levels
    assert "clients.keys.team-a" in levels and "clients.defaults" in levels


@pytest.mark.parametrize("level", _levels(), ids=lambda p: ".".join(p) or "(top)")
def test_an_unknown_key_at_any_level_is_an_error(level: tuple[str, ...]) -> None:
    config = _shipped()
    node = config
    for part in level:
        node = node[part]
    node["surprise_knob"] = 1
    with pytest.raises(ValidationError, match="surprise_knob"):
        GatewayConfig.model_validate(config)


def test_a_provider_with_an_unknown_adapter_is_an_error() -> None:
    config = _shipped()
    config["providers"]["fal"]["adapter"] = "flal"
    with pytest.raises(ValidationError, match="flal"):
        GatewayConfig.model_validate(config)


def test_a_config_error_is_one_line_naming_the_file_and_the_place(tmp_path: Path) -> None:
    config = _shipped()
    config["routing"]["breaker"]["threshold"] = 3
    config["limits"]["max_n"] = 0
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "routing.breaker.threshold" in message and "limits.max_n" in message


@pytest.mark.parametrize("text", ["limits: [1\n", "- a list\n", "limits: 3\n"])
def test_yaml_that_is_no_config_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"g\.yaml") as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- production's requirements

COMPLETE = {
    "GATEWAY_ENV": "production",
    "FAL_KEY": "fal-key",
    "GATEWAY_API_KEYS": "client-key",
    "GATEWAY_SIGNING_KEY": "signing-key-0123456789",
    "GATEWAY_PUBLIC_URL": "https://gw.example.com",
    "GATEWAY_METRICS_KEY": "metrics-key",
}


def _production(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in ("REPLICATE_API_TOKEN", "GATEWAY_SANDBOX", "GATEWAY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**COMPLETE, **env}.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_complete_production_settings_have_no_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _production(monkeypatch)
    assert (
        settings.production_refusals(
            GatewayConfig.model_validate(yaml.safe_load(CONFIG.read_text()))
        )
        == []
    )


@pytest.mark.parametrize("name", sorted(set(COMPLETE) - {"GATEWAY_ENV"}))
def test_production_refuses_each_missing_setting(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    settings = _production(monkeypatch, **{name: ""})
    refusals = settings.production_refusals(
        GatewayConfig.model_validate(yaml.safe_load(CONFIG.read_text()))
    )
    assert len(refusals) == 1 and name in refusals[0], refusals


def test_development_has_no_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _production(monkeypatch, GATEWAY_ENV="development", FAL_KEY="", GATEWAY_SANDBOX="1")
    assert (
        settings.production_refusals(
            GatewayConfig.model_validate(yaml.safe_load(CONFIG.read_text()))
        )
        == []
    )


def test_production_refuses_sandbox_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _production(monkeypatch, GATEWAY_SANDBOX="true")
    refusals = settings.production_refusals(
        GatewayConfig.model_validate(yaml.safe_load(CONFIG.read_text()))
    )
    assert len(refusals) == 1 and "sandbox" in refusals[0].lower(), refusals


def test_a_settings_error_is_one_line_without_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "eighty")
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", "https://user:hunter2@gw.example.com")
    with pytest.raises(ValidationError) as caught:
        Settings()
    line = settings_error(caught.value)
    assert "\n" not in line and "GATEWAY_PORT" in line and "GATEWAY_PUBLIC_URL" in line
    assert "hunter2" not in line and "eighty" not in line
