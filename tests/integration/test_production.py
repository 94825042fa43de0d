"""Production by accident (issue 14): `GATEWAY_ENV=production` starts only when it is
complete, never falls back to sandbox mode, and a bad config or setting is one line and exit
status 2 in any environment. What a running production gateway shows: /readyz's provider
addresses to the admin key only, /metrics to its own bearer credential only.

The providers here are addresses where nothing listens: nothing in these tests upscales, so
no emulator (and no ledger reconciliation, which scrapes /metrics without a key) is needed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import Emulator, write_config
from tests.integration.servers import DEFAULT_ADMIN_KEY, LAUNCH, ROOT, GatewayProcess

METRICS_KEY = "test-metrics-key-5b1d"
CLIENT_KEY = "test-client-key-91c2"
PUBLIC_URL = "https://gw.example.com"
EXIT_REFUSED = 2
# Everything production asks for; each test drops what it checks.
COMPLETE = {
    "GATEWAY_ENV": "production",
    "FAL_KEY": "fal-test-key",
    "REPLICATE_API_TOKEN": "r8_test_token",
    "GATEWAY_API_KEYS": CLIENT_KEY,
    "GATEWAY_PUBLIC_URL": PUBLIC_URL,
    "GATEWAY_METRICS_KEY": METRICS_KEY,
}
REQUIRED = {  # the variable dropped -> the name the refusal must say
    "GATEWAY_API_KEYS": "GATEWAY_API_KEYS",
    "GATEWAY_SIGNING_KEY": "GATEWAY_SIGNING_KEY",
    "GATEWAY_PUBLIC_URL": "GATEWAY_PUBLIC_URL",
    "GATEWAY_METRICS_KEY": "GATEWAY_METRICS_KEY",
}


def run_to_exit(
    tmp_path: Path, env: dict[str, str], *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m gateway` as GatewayProcess would start it; it must exit on its own (a
    gateway that starts serving instead is killed by the timeout, failing the test)."""
    config = config or write_config(tmp_path / "gateway.yaml")
    process = GatewayProcess({"GATEWAY_CONFIG": str(config), **env}, tmp_path, args)
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, *args],
        cwd=ROOT,
        env=process.env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def assert_one_line_refusal(run: subprocess.CompletedProcess[str]) -> str:
    output = (run.stderr + run.stdout).strip()
    assert run.returncode == EXIT_REFUSED, (run.returncode, output)
    assert "Traceback" not in output, output
    assert len(output.splitlines()) == 1, output
    return output


def production_env(**changes: str | None) -> dict[str, str]:
    """COMPLETE with changes; None drops a name (GatewayProcess's own defaults included:
    an empty value is unset to pydantic-settings' `or None` readers and to the checks)."""
    env = {**COMPLETE}
    for name, value in changes.items():
        env[name] = "" if value is None else value
    return env


# ------------------------------------------------------------------ refusing to start


def test_production_with_nothing_set_names_everything_missing(tmp_path: Path) -> None:
    # Was: no credentials meant sandbox mode, so a forgotten .env served emulated images.
    env = {
        "GATEWAY_ENV": "production",
        "GATEWAY_SIGNING_KEY": "",
        "GATEWAY_ADMIN_KEY": "",
    }
    line = assert_one_line_refusal(run_to_exit(tmp_path, env))
    for name in (
        "FAL_KEY",
        "REPLICATE_API_TOKEN",
        "GATEWAY_API_KEYS",
        "GATEWAY_SIGNING_KEY",
        "GATEWAY_PUBLIC_URL",
        "GATEWAY_METRICS_KEY",
    ):
        assert name in line, (name, line)


@pytest.mark.parametrize("dropped", sorted(REQUIRED))
def test_production_names_the_one_thing_missing(tmp_path: Path, dropped: str) -> None:
    line = assert_one_line_refusal(run_to_exit(tmp_path, production_env(**{dropped: None})))
    assert REQUIRED[dropped] in line, line
    for other in set(REQUIRED) - {dropped}:
        assert other not in line, (other, line)


def test_production_without_a_provider_credential_is_refused(tmp_path: Path) -> None:
    env = production_env(FAL_KEY=None, REPLICATE_API_TOKEN=None)
    line = assert_one_line_refusal(run_to_exit(tmp_path, env))
    assert "FAL_KEY" in line and "REPLICATE_API_TOKEN" in line, line


def test_a_credential_of_a_disabled_provider_does_not_count(tmp_path: Path) -> None:
    config = write_config(tmp_path / "g.yaml", providers={"replicate": {"enabled": False}})
    env = production_env(FAL_KEY=None)  # only Replicate's token, and Replicate is off
    line = assert_one_line_refusal(run_to_exit(tmp_path, env, config=config))
    assert "FAL_KEY" in line, line


def test_a_named_key_in_the_config_is_a_client_key(tmp_path: Path) -> None:
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    config = write_config(tmp_path / "g.yaml", clients={"keys": {"team-a": {"sha256": digest}}})
    env = production_env(GATEWAY_API_KEYS=None, GATEWAY_METRICS_KEY=None)
    line = assert_one_line_refusal(run_to_exit(tmp_path, env, config=config))
    assert "GATEWAY_METRICS_KEY" in line and "GATEWAY_API_KEYS" not in line, line


@pytest.mark.parametrize(
    ("env", "args"),
    [({}, ("--sandbox",)), ({"GATEWAY_SANDBOX": "true"}, ())],
    ids=["--sandbox", "GATEWAY_SANDBOX"],
)
def test_production_refuses_sandbox_mode(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...]
) -> None:
    line = assert_one_line_refusal(run_to_exit(tmp_path, production_env(**env), *args))
    assert "sandbox" in line.lower(), line


# ------------------------------------------------------------------ config and settings errors


def _config_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    return path


def _valid_with(tmp_path: Path, edit: dict[str, object]) -> str:
    config = yaml.safe_load(write_config(tmp_path / "base.yaml").read_text())
    for dotted, value in edit.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return yaml.safe_dump(config)


# Each case in one environment, both environments covered: a process start costs 1.5 s, and
# the config is read the same way in both (tests/unit/test_settings.py has every level).
@pytest.mark.parametrize(
    ("case", "expected", "environment"),
    [
        ("bad yaml", "broken.yaml", "development"),
        ("unknown top-level key", "routnig", "production"),
        ("unknown nested key", "routing.breaker.threshold", "development"),
        ("unknown provider key", "providers.fal.price", "production"),
        ("invalid value", "limits.max_n", "development"),
        ("unknown adapter", "providers.fal.adapter", "production"),
        ("missing file", "missing.yaml", "production"),
    ],
)
def test_a_config_error_is_one_line_and_exit_2(
    tmp_path: Path, case: str, expected: str, environment: str
) -> None:
    texts = {
        "bad yaml": "limits: {max_n: [1\n",
        "unknown top-level key": _valid_with(tmp_path, {"routnig": {}}),
        "unknown nested key": _valid_with(tmp_path, {"routing.breaker.threshold": 3}),
        "unknown provider key": _valid_with(tmp_path, {"providers.fal.price": 0.1}),
        "invalid value": _valid_with(tmp_path, {"limits.max_n": 0}),
        "unknown adapter": _valid_with(tmp_path, {"providers.fal.adapter": "flal"}),
    }
    config = tmp_path / "missing.yaml" if case == "missing file" else None
    if case in texts:
        config = _config_with(tmp_path, texts[case])
    env = production_env() if environment == "production" else {}
    line = assert_one_line_refusal(run_to_exit(tmp_path, env, config=config))
    assert expected in line, line


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({"GATEWAY_ENV": "prod"}, "GATEWAY_ENV"),  # a typo is no way into development mode
        ({"GATEWAY_WORKERS": "0"}, "GATEWAY_WORKERS"),
        ({"GATEWAY_PUBLIC_URL": "https://u:p@gw.example.com"}, "GATEWAY_PUBLIC_URL"),
        ({**COMPLETE, "GATEWAY_API_KEYS": "changeme"}, "GATEWAY_API_KEYS"),
    ],
)
def test_an_invalid_setting_is_one_line_and_exit_2(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    line = assert_one_line_refusal(run_to_exit(tmp_path, env))
    assert expected in line, line
    assert "u:p@" not in line and "changeme" not in line, line  # values may be secrets


# ------------------------------------------------------------------ a production gateway


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("production")
    unreachable = {"fal": Emulator.unreachable().url, "replicate": Emulator.unreachable().url}
    process = GatewayProcess(
        {
            **COMPLETE,
            "GATEWAY_CONFIG": str(write_config(workdir / "gateway.yaml")),
            "GATEWAY_FAL_URL": unreachable["fal"],
            "GATEWAY_REPLICATE_URL": unreachable["replicate"],
        },
        workdir,
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def development(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Sandbox mode (no credentials), with a metrics key."""
    workdir = tmp_path_factory.mktemp("development")
    process = GatewayProcess(
        {
            "GATEWAY_CONFIG": str(write_config(workdir / "gateway.yaml")),
            "GATEWAY_METRICS_KEY": METRICS_KEY,
        },
        workdir,
    ).start()
    yield process
    process.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_complete_production_gateway_is_ready_and_live(production: GatewayProcess) -> None:
    ready = httpx.get(f"{production.url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["sandbox"] is False and body["mode"] == "live"
    assert {p["name"] for p in body["providers"]} == {"fal", "replicate"}
    assert not any(p["emulated"] for p in body["providers"])
    assert "SANDBOX" not in production.log()


def test_readyz_shows_provider_addresses_to_the_admin_key_only(
    production: GatewayProcess,
) -> None:
    for headers in ({}, bearer("wrong"), bearer(CLIENT_KEY), bearer(METRICS_KEY)):
        answer = httpx.get(f"{production.url}/readyz", headers=headers, timeout=5)
        for provider in answer.json()["providers"]:
            assert "base_url" not in provider, (headers, provider)
            assert {"name", "enabled"} <= set(provider), provider
        for url in production.provider_urls.values():
            assert url and url not in answer.text, headers
    admin = httpx.get(f"{production.url}/readyz", headers=bearer(DEFAULT_ADMIN_KEY), timeout=5)
    shown = {p["name"]: p["base_url"] for p in admin.json()["providers"]}
    assert shown == production.provider_urls


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_metrics_needs_the_metrics_key(production: GatewayProcess, method: str) -> None:
    for headers in ({}, bearer("wrong"), bearer(CLIENT_KEY), {"Authorization": METRICS_KEY}):
        answer = httpx.request(method, f"{production.url}/metrics", headers=headers, timeout=5)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
        if method == "GET":
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert METRICS_KEY not in answer.text
    scraped = httpx.request(
        method, f"{production.url}/metrics", headers=bearer(METRICS_KEY), timeout=5
    )
    assert scraped.status_code == 200
    if method == "GET":
        assert "upscale_requests" in scraped.text or "# HELP" in scraped.text


def test_metrics_key_applies_in_development_too(development: GatewayProcess) -> None:
    assert httpx.get(f"{development.url}/metrics", timeout=5).status_code == 401
    scraped = httpx.get(f"{development.url}/metrics", headers=bearer(METRICS_KEY), timeout=5)
    assert scraped.status_code == 200 and "# HELP" in scraped.text


def test_development_sandbox_readiness_is_unchanged(development: GatewayProcess) -> None:
    ready = httpx.get(f"{development.url}/readyz", timeout=5)
    assert ready.status_code == 200
    body = ready.json()
    assert body["sandbox"] is True and body["status"] == "ready"
    assert all(p["emulated"] and p["enabled"] for p in body["providers"])


def test_openapi_says_metrics_needs_its_key(development: GatewayProcess) -> None:
    document = httpx.get(f"{development.url}/openapi.json", timeout=5).json()
    operations = document["paths"]["/metrics"]
    assert set(operations) == {"get", "head"}
    for operation in operations.values():
        assert "401" in operation["responses"], operation["responses"]
        assert operation.get("security") == [{"metricsKey": []}], operation
    scheme = document["components"]["securitySchemes"]["metricsKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert "GATEWAY_METRICS_KEY" in scheme["description"]
