"""Routing scenarios with the emulators' fault scripts and a real Redis on a free port:
breaker open/probe/recovery, latency-driven choice, hedging against a tail, three replicas
sharing one Redis, and Redis dying under load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from bench.hedging import measure
from tests.conftest import make_image
from tests.integration.conftest import Emulator
from tests.integration.redis_server import RedisServer
from tests.integration.replicas import Gateways
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"


def upscale(gateway: GatewayProcess, **fields: str) -> httpx.Response:
    response = httpx.post(
        f"{gateway.url}/v1/images/edits",
        timeout=60,
        files={"image": ("a.png", make_image(40, 40), "image/png")},
        data={"model": MODEL, "response_format": "b64_json", **fields},
    )
    assert response.status_code == 200, response.text
    return response


def fal_submits(fal: Emulator) -> int:
    return sum(1 for r in fal.requests() if r["path"].endswith("/crisp"))


def test_cheapest_sends_nearly_everything_to_fal(gateways: Gateways) -> None:
    (gateway,) = gateways.start()
    providers = [upscale(gateway).headers["x-upscale-provider"] for _ in range(20)]
    assert providers.count("fal") >= 19


def test_breaker_opens_probes_and_recovers(gateways: Gateways) -> None:
    (gateway,) = gateways.start()
    fal = gateways.fal
    fal.faults(error_rate=1, error_status=500)
    attempts = [upscale(gateway).headers["x-upscale-attempts"] for _ in range(6)]
    assert attempts[:3] == ["fal=ProviderUnavailable,replicate=ok"] * 3
    assert attempts[3:] == ["replicate=ok"] * 3  # open: no error ever reached the client
    assert fal_submits(fal) == 3
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'upscale_breaker_state{provider="fal"} 2.0' in metrics
    time.sleep(2.1)  # the cool-down passes: one probe, which fails and re-opens for longer
    assert upscale(gateway).headers["x-upscale-attempts"] == (
        "fal=ProviderUnavailable+probe,replicate=ok"
    )
    assert fal_submits(fal) == 4
    fal.faults()  # the fault is lifted
    assert upscale(gateway).headers["x-upscale-attempts"] == "replicate=ok"  # still open
    time.sleep(4.1)
    assert upscale(gateway).headers["x-upscale-attempts"] == "fal=ok+probe"
    providers = [upscale(gateway).headers["x-upscale-provider"] for _ in range(5)]
    assert providers == ["fal"] * 5  # traffic is back


def test_fastest_moves_to_the_faster_provider_after_warm_up(gateways: Gateways) -> None:
    # fal is slow, not broken: its 3 s must not be cut off by a shorter attempt budget.
    (gateway,) = gateways.start(providers={"fal": {"attempt_timeout_s": 20}})
    gateways.fal.faults(latency_ms=3000, jitter_ms=100)
    gateways.replicate.faults(latency_ms=300, jitter_ms=50)
    providers = [
        upscale(gateway, **{"provider[sort]": "latency"}).headers["x-upscale-attempts"]
        for _ in range(6)
    ]
    # Each provider is measured once (unmeasured ones go first), then replicate wins.
    assert providers[2:] == ["replicate=ok"] * 4, providers
    assert sorted(providers[:2]) == ["fal=ok", "replicate=ok"], providers


def test_hedging_halves_p99_within_budget(gateways: Gateways) -> None:
    # fal may take its 5 s tail (no shorter attempt budget cuts it off here).
    (gateway,) = gateways.start(
        providers={"fal": {"attempt_timeout_s": 20}}, hedge={"delay": 0.5, "budget_share": 0.2}
    )
    gateways.fal.faults(latency_ms=50, jitter_ms=10, tail_ratio=0.1, tail_ms=5000, seed=7)
    gateways.replicate.faults(latency_ms=150, jitter_ms=30, seed=8)
    figures = measure(gateway.url, make_image(48, 48), requests=60, concurrency=4)
    print(figures)
    assert figures["off"]["p99_s"] > 4  # the tail is real
    assert figures["p99_ratio"] <= 0.5, figures
    budget = int(0.2 * 2 * 60) + 1
    assert 0 < figures["on"]["hedges"] <= budget
    extra = figures["on"]["spend_usd"] - 60 * 0.004
    assert extra <= budget * 0.006 + 1e-9


def test_three_replicas_share_the_breaker_and_one_probe(gateways: Gateways) -> None:
    first, second, third = gateways.start(3)
    fal = gateways.fal
    fal.faults(error_rate=1, error_status=500)
    for _ in range(3):
        upscale(first)
    for other in (second, third):  # honoured on their next request
        assert upscale(other).headers["x-upscale-attempts"] == "replicate=ok"
    assert fal_submits(fal) == 3
    fal.faults(latency_ms=1500, jitter_ms=0)  # healthy again, and slow enough to overlap
    time.sleep(2.1)
    with ThreadPoolExecutor(9) as pool:
        answers = list(
            pool.map(lambda g: upscale(g).headers["x-upscale-attempts"], [first, second, third] * 3)
        )
    probes = [a for a in answers if "+probe" in a]
    assert probes == ["fal=ok+probe"], answers
    assert fal_submits(fal) == 4  # exactly one probe reached fal across the three replicas


def test_operator_drain_reaches_every_replica(gateways: Gateways) -> None:
    first, second = gateways.start(2, env={"GATEWAY_ADMIN_KEY": "admin-secret"})
    admin = {"Authorization": "Bearer admin-secret"}
    assert httpx.put(f"{first.url}/admin/providers/fal/drain").status_code == 401
    assert httpx.put(f"{first.url}/admin/providers/fal/drain", headers=admin).json() == {
        "provider": "fal",
        "drained": True,
    }
    time.sleep(1.1)  # the other replica's one-second view expires
    assert upscale(second).headers["x-upscale-provider"] == "replicate"
    records = httpx.get(f"{second.url}/admin/providers", headers=admin).json()["data"]
    assert {r["provider"]: r["drained"] for r in records} == {"fal": True, "replicate": False}
    httpx.delete(f"{second.url}/admin/providers/fal/drain", headers=admin).raise_for_status()
    time.sleep(1.1)
    assert upscale(first).headers["x-upscale-provider"] == "fal"


def test_redis_killed_under_load(
    gateways: Gateways, redis_server: RedisServer, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path).start()
    gateways.redis_url = server.url
    (gateway,) = gateways.start()
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            response = httpx.post(
                f"{gateway.url}/v1/images/edits",
                timeout=60,
                files={"image": ("a.png", make_image(40, 40), "image/png")},
                data={"model": MODEL, "response_format": "b64_json"},
            )
            statuses.append(response.status_code)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.5)
        server.stop()
        deadline = time.monotonic() + 10
        while httpx.get(f"{gateway.url}/readyz").json()["status"] != "degraded":
            assert time.monotonic() < deadline, ("readyz never reported the outage", gateway.log())
            time.sleep(0.1)
        served_during = len(statuses)
        time.sleep(2)
        assert len(statuses) > served_during  # still serving without Redis
        server = RedisServer(tmp_path, port=server.port).start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{gateway.url}/readyz").json()["status"] != "ready":
            assert time.monotonic() < deadline, ("readyz never recovered", gateway.log())
            time.sleep(0.1)
        time.sleep(1)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    try:
        failed = [s for s in statuses if s != 200]
        assert statuses and not failed, (failed, gateway.log())
        keys = redis.Redis(port=server.port).keys(f"{gateways.prefix}:*")
        assert keys, ("state did not resume in Redis", gateway.log())
        assert "upscale_state_store_degraded 0.0" in httpx.get(f"{gateway.url}/metrics").text
    finally:
        server.stop()
