"""A real gateway process on a free port, for the integration tests.

Every process has an admin key (a test's own, or DEFAULT_ADMIN_KEY), so its ledger can be
read, and is listed in LIVE from start to stop: the reconciliation after each scenario
(`tests/integration/reconcile.py`) finds the gateways a test used there."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The gateway runs as `python -m gateway` would, with the loopback-only guard installed first.
LAUNCH = (
    "import tests.integration.netguard as g; g.install(); from gateway.__main__ import main; main()"
)


DEFAULT_ADMIN_KEY = "test-admin-key-7e3f9a"
MICROS = 1_000_000
# Gateway processes started and not yet stopped (a killed one stays until stop() is called),
# and every one ever started, in order: a scenario's are those started since it began.
LIVE: set[GatewayProcess] = set()
STARTED: list[GatewayProcess] = []
_SPEND_METRIC = re.compile(r'^upscale_spend_usd_total\{provider="([^"]+)"\} (\S+)$', re.M)


def _worker_ports() -> Iterator[int]:
    """Under pytest-xdist each worker takes its ports from a range of its own, below the
    kernel's ephemeral range (32768 and up, where bind(0) picks): a port one worker found
    free and has not bound yet can never be handed to another worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    start = 12000 + int(worker[2:]) * 2500
    while True:
        yield from range(start, start + 2500)


_PORTS = _worker_ports()


def free_port() -> int:
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    def __init__(self, env: Mapping[str, str], workdir: Path, args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gateway-{self.port}.log"
        clean = {
            k: v
            for k, v in os.environ.items()
            if k not in ("FAL_KEY", "REPLICATE_API_TOKEN", "REDIS_URL")
            and not k.startswith("GATEWAY_")
        }
        self.env = {
            **clean,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_RESULTS_DIR": str(workdir / f"results-{self.port}"),
            "GATEWAY_SIGNING_KEY": "test-signing-key-0123456789abcdef",
            "GATEWAY_LOG_LEVEL": "info",
            "PYTHONPATH": str(ROOT),
            "GATEWAY_ADMIN_KEY": DEFAULT_ADMIN_KEY,
            **env,
        }
        self.admin_key = self.env["GATEWAY_ADMIN_KEY"] or None
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        LIVE.add(self)
        STARTED.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code in (200, 503):
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def provider_urls(self) -> dict[str, str | None]:
        """Where its providers are (None: sandbox mode's own in-process emulators)."""
        return {
            "fal": self.env.get("GATEWAY_FAL_URL"),
            "replicate": self.env.get("GATEWAY_REPLICATE_URL"),
        }

    @property
    def store_key(self) -> tuple[str, ...]:
        """Which ledger it writes: one per Redis URL and key prefix; else its own."""
        redis_url = self.env.get("REDIS_URL")
        if not redis_url:
            return ("memory", self.url, str(id(self)))
        prefix = "upscale"
        config = self.env.get("GATEWAY_CONFIG")
        if config and Path(config).exists():
            loaded: Any = yaml.safe_load(Path(config).read_text()) or {}
            prefix = (loaded.get("routing") or {}).get("redis_prefix") or prefix
        return ("redis", redis_url, prefix)

    @property
    def workers(self) -> int:
        """Worker processes on its port: each has its own metrics (and, without Redis, its
        own ledger), and any one of them answers a request."""
        return int(self.env.get("GATEWAY_WORKERS") or 1)

    def ledger_micros(self) -> dict[str, int]:
        """Micro-USD per provider in its ledger (every key, today and yesterday, UTC):
        /admin/spend shows USD rounded to 6 places, so micro-dollars come back exact."""
        return self.ledger_state()[0]

    def ledger_state(self) -> tuple[dict[str, int], int]:
        """The ledger (as `ledger_micros`) and how many of this process's bills may still
        add to it (`unsettled_bills`)."""
        response = httpx.get(
            f"{self.url}/admin/spend?days=2",
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )
        response.raise_for_status()
        body = response.json()
        ledger = {
            provider: round(row["spend_usd"] * MICROS)
            for provider, row in body["by_provider"].items()
        }
        return ledger, int(body["unsettled_bills"])

    def spend_metric_micros(self) -> dict[str, int]:
        """`upscale_spend_usd` per provider in this process, in micro-USD."""
        key = self.env.get("GATEWAY_METRICS_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10)
        response.raise_for_status()
        return {
            provider: round(float(value) * MICROS)
            for provider, value in _SPEND_METRIC.findall(response.text)
        }

    def stop(self) -> None:
        LIVE.discard(self)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
