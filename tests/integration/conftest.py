from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from adapters.emulators import (
    BackgroundServer,
    EmulatorConfig,
    FaultScript,
    create_fal_app,
    create_replicate_app,
)
from tests.integration import netguard, reconcile
from tests.integration.redis_server import RedisServer
from tests.integration.s3_server import S3Server
from tests.integration.servers import ROOT, GatewayProcess, free_port

FAL_KEY = "fal-test-key"
REPLICATE_TOKEN = "r8_test_token"
QUIET = {"latency_ms": 30, "jitter_ms": 10}  # short, but long enough to be polled


@pytest.fixture(scope="session", autouse=True)
def loopback_only() -> None:
    netguard.install()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Ledger = providers' bills after every test on the session's emulators: snapshot once
    its fixtures are up, reconcile once its body passed, before any fixture's teardown stops
    the gateways it used (a fixture's teardown would run too late). A test marked
    `unreconciled(reason)` is exempt, for that reason."""
    funcargs = getattr(item, "funcargs", {})
    emulators = {
        provider: funcargs[name]
        for provider, name in (("fal", "fal_emulator"), ("replicate", "replicate_emulator"))
        if isinstance(funcargs.get(name), Emulator)
    }
    if not emulators or item.get_closest_marker("unreconciled"):
        return (yield)
    before = reconcile.snapshot(emulators)
    result = yield  # a failing test raises here: its own failure is the one to read
    checked = reconcile.check(before, emulators)
    item.add_report_section("call", "ledger = bills", checked.table())  # shown by -rP
    checked.assert_ok()
    return result


class Emulator:
    def __init__(self, server: BackgroundServer):
        self.server = server
        self.url = server.url

    @classmethod
    def unreachable(cls) -> Emulator:
        """A provider address where nothing listens: every call is a connect error."""
        closed = cls.__new__(cls)
        closed.url = f"http://127.0.0.1:{free_port()}"
        return closed

    def faults(self, **script: Any) -> None:
        body = {**QUIET, **script}
        httpx.put(f"{self.url}/_emulator/faults", json=body, timeout=5).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/_emulator/requests", timeout=5)
        response.raise_for_status()
        body = response.json()
        return body["requests"] if isinstance(body, dict) else body

    def jobs(self) -> dict[str, Any]:
        """`{"jobs": [...], "billed_micros": n, ...}`: every job and the running bill."""
        return reconcile.emulator_jobs(self)

    def reset(self) -> None:
        self.faults()
        httpx.delete(f"{self.url}/_emulator/requests", timeout=5).raise_for_status()


@pytest.fixture(scope="session")
def fal_emulator() -> Iterator[Emulator]:
    config = EmulatorConfig(api_key=FAL_KEY, faults=FaultScript(**QUIET))
    with BackgroundServer(create_fal_app(config)) as server:
        yield Emulator(server)


@pytest.fixture(scope="session")
def replicate_emulator() -> Iterator[Emulator]:
    config = EmulatorConfig(api_key=REPLICATE_TOKEN, faults=FaultScript(**QUIET))
    with BackgroundServer(create_replicate_app(config)) as server:
        yield Emulator(server)


def write_config(path: Path, **overrides: dict[str, Any]) -> Path:
    config = yaml.safe_load((ROOT / "config/gateway.yaml").read_text())
    config["providers"]["fal"].update(poll_initial_s=0.02, poll_max_s=0.1, attempt_timeout_s=3)
    config["providers"]["replicate"].update(poll_initial_s=0.02, poll_max_s=0.1, wait_s=5)
    config["limits"]["request_timeout_s"] = 20
    config["limits"]["body_idle_timeout_s"] = 3  # the stalled-body tests wait for it
    # Request-path tests must not depend on one another through the breaker or exploration;
    # the routing scenarios configure both themselves.
    config["routing"]["breaker"]["failure_threshold"] = 1000
    config["routing"]["explore_share"] = 0
    # Tests reuse images and count provider calls: the cache's own tests turn it on.
    config["cache"] = {"enabled": False}
    for section, values in overrides.items():
        _merge(config.setdefault(section, {}), values)
    path.write_text(yaml.safe_dump(config))
    return path


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def start_gateway(
    workdir: Path, fal: Emulator, replicate: Emulator, config: Path, **env: str
) -> GatewayProcess:
    return GatewayProcess(
        {
            "FAL_KEY": FAL_KEY,
            "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
            "GATEWAY_FAL_URL": fal.url,
            "GATEWAY_REPLICATE_URL": replicate.url,
            "GATEWAY_CONFIG": str(config),
            **env,
        },
        workdir,
    ).start()


@contextlib.contextmanager
def own_gateway(
    factory: pytest.TempPathFactory, fal: Emulator, replicate: Emulator, **config: dict[str, Any]
) -> Iterator[GatewayProcess]:
    """A gateway process of a test module's own, on the shared emulators."""
    workdir = factory.mktemp("gateway")
    process = start_gateway(
        workdir, fal, replicate, write_config(workdir / "gateway.yaml", **config)
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    with own_gateway(tmp_path_factory, fal_emulator, replicate_emulator) as process:
        yield process


@pytest.fixture
def emulators(
    fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[tuple[Emulator, Emulator]]:
    fal_emulator.reset()
    replicate_emulator.reset()
    yield fal_emulator, replicate_emulator
    fal_emulator.reset()
    replicate_emulator.reset()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own, on a free port."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3-compatible server (moto) of the module's own, on a free port."""
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def gateways(
    tmp_path: Path, emulators: tuple[Emulator, Emulator], redis_server: RedisServer
) -> Iterator[Any]:
    """Gateway replicas of one test on the module's Redis (`replicas.Gateways`)."""
    from tests.integration.replicas import Gateways  # it builds on this module's helpers

    fal, replicate = emulators
    group = Gateways(tmp_path, fal, replicate, redis_server.url)
    yield group
    group.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, driven by Playwright (tests/integration/browser.py)."""
    from tests.integration.browser import chromium  # only the browser tests load Playwright

    with chromium() as launched:
        yield launched


@pytest.fixture
def client(gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="any", max_retries=0, timeout=60)
