"""What the hand-made bad-input modules share: the per-case health and memory check, and
sending one case with the harness's contract checked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.servers import GatewayProcess
from tests.reliability import harness
from tests.reliability.forms import BOUNDARY, Part, multipart
from tests.reliability.harness import Sent


@pytest.fixture(autouse=True)
def still_healthy(
    gateway: GatewayProcess, baseline_kib: int, quiet_emulators: None
) -> Iterator[None]:
    """After every case: the process answers /healthz, no input cost more memory than the
    budget, and the process keeps no more than the leak budget over its baseline."""
    yield
    problems = harness.memory_problems(gateway, baseline_kib)
    assert not problems, "\n".join(problems)


def post(
    http: httpx.Client, gateway: GatewayProcess, sent: Sent, artifacts: Path
) -> httpx.Response:
    found = harness.new_violations()
    response = harness.send(http, gateway, "handmade", sent, found)
    assert not found, found.report(artifacts)
    assert response is not None
    return response


def error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(response.content)["error"]
    return body


def form(parts: list[Part], content_type: bytes | None = None) -> Sent:
    ctype = content_type or b"multipart/form-data; boundary=" + BOUNDARY
    return Sent(((b"Content-Type", ctype),), multipart(parts))
