"""The integration suite's fixtures (a real gateway process on the fal and Replicate
emulators), a warmed-up baseline of the gateway's memory, and the closing tally of inputs
tried. `pytest_plugins` in a non-root conftest is refused by pytest, so the fixtures are
assigned here: pytest registers them under the same names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.integration import conftest as integration
from tests.integration.conftest import Emulator
from tests.integration.servers import GatewayProcess
from tests.reliability import harness
from tests.reliability.forms import multipart, valid_parts
from tests.reliability.images import tiny

# The integration suite's fixtures, registered here under their own names.
loopback_only = integration.loopback_only
fal_emulator = integration.fal_emulator
replicate_emulator = integration.replicate_emulator
gateway = integration.gateway
emulators = integration.emulators
client = integration.client
# Ledger = bills after every test here too (the hook that checks it after each test).
pytest_runtest_call = integration.pytest_runtest_call


@pytest.fixture(scope="session")
def stall_probe(gateway: GatewayProcess) -> harness.StallProbe:
    """Bodies that never end, hanging from the session's start (see StallProbe)."""
    return harness.StallProbe(gateway, stalled_requests()).start()


def stalled_requests() -> dict[str, bytes]:
    def head(content_type: str, declared: int) -> bytes:
        return (
            f"POST {harness.EDITS} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}"
            f"\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()

    form = multipart(valid_parts(tiny("PNG")))
    return {
        "multipart": head("multipart/form-data; boundary=gw-boundary", 100_000) + form[:500],
        "json": head("application/json", 1000) + b'{"image": "data:image/png;base',
        "headers-only": head("multipart/form-data; boundary=gw-boundary", 5000),
    }


@pytest.fixture(scope="session")
def baseline_kib(
    gateway: GatewayProcess, fal_emulator: Emulator, stall_probe: harness.StallProbe
) -> int:
    """The gateway's resident set once every codec has been through it once (each input
    format, each output format): what it keeps past this, bad input made it keep. (It
    starts the stall probe too, so the probe hangs in the background from the first test.)"""
    fal_emulator.reset()
    with httpx.Client(timeout=60) as http:
        for fmt in ("PNG", "JPEG", "GIF", "WEBP", "AVIF"):
            out = fmt.lower()
            body = multipart(valid_parts(tiny(fmt), scale_factor="2", output_format=out, n="2"))
            response = http.post(
                f"{gateway.url}{harness.EDITS}",
                content=body,
                headers=list(harness.multipart_headers()),
            )
            assert response.status_code == 200, response.text
    return harness.rss_kib(gateway)


@pytest.fixture(scope="module")
def quiet_emulators(fal_emulator: Emulator, replicate_emulator: Emulator) -> Iterator[None]:
    """`emulators` once per module: its reset costs a quarter second, too much per case."""
    fal_emulator.reset()
    replicate_emulator.reset()
    yield
    fal_emulator.reset()
    replicate_emulator.reset()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the full request of each violation is written."""
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=harness.REQUEST_TIMEOUT_S) as session:
        yield session


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not harness.TRIED:
        return
    terminalreporter.write_sep("-", "reliability: bad input")
    terminalreporter.write_line(harness.summary())
    out = os.environ.get("RELIABILITY_REPORT")
    if out:
        with open(out, "wb") as f:
            f.write(
                orjson.dumps(
                    {
                        "bad_inputs_tried": sum(harness.TRIED.values()),
                        "by_generator": dict(harness.TRIED),
                        "accepted": dict(harness.ACCEPTED),
                        "statuses": {str(k): v for k, v in harness.STATUSES.items()},
                        "violations": [
                            {"signature": v.signature, "count": v.count, "generator": v.generator}
                            for found in harness.ALL_VIOLATIONS
                            for v in found.found.values()
                        ],
                    },
                    option=orjson.OPT_INDENT_2,
                )
            )
