"""Platform controls across three replicas on one Redis: one budget holds under 50
concurrent requests, and the operator's price and breaker reset reach every replica."""

from __future__ import annotations

import hashlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_image
from tests.integration.replicas import Gateways
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
KEY = "sk-budget-6c1e0f"
ADMIN = "admin-77a0c3"


def post(gateway: GatewayProcess, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/images/edits",
        timeout=60,
        headers={"Authorization": f"Bearer {key}"} if key else {},
        files={"image": ("a.png", make_image(40, 40), "image/png")},
        data={"model": MODEL, "response_format": "b64_json"},
    )


def explain(answer: httpx.Response) -> str:
    """An answer's status, error code and message, and its attempts: a failure says why."""
    try:
        error = answer.json().get("error") or {}
    except ValueError:
        error = {"message": answer.text[:300]}
    return (
        f"{answer.status_code} {error.get('code')}: {error.get('message')} "
        f"(x-upscale-attempts={answer.headers.get('x-upscale-attempts', '')!r}, "
        f"{answer.headers.get('x-request-id')})"
    )


def test_three_replicas_enforce_one_budget_under_50_concurrent_requests(
    gateways: Gateways,
) -> None:
    budget = 0.04
    replicas = gateways.start(
        3,
        env={"GATEWAY_ADMIN_KEY": ADMIN},
        sections={
            "clients": {
                "keys": {
                    "capped": {
                        "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                        "usd_per_day": budget,
                    }
                }
            }
        },
    )
    gateways.fal.faults(latency_ms=300, jitter_ms=200)  # requests overlap across replicas
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda n: post(replicas[n % 3], KEY), range(50)))
    codes = [a.status_code for a in answers]
    unexpected = [explain(a) for a in answers if a.status_code not in (200, 429)]
    assert not unexpected, "\n".join(unexpected)
    charged = sum(float(a.headers.get("x-upscale-cost-usd", 0)) for a in answers)
    submitted = sum(
        1
        for r in gateways.fal.requests() + gateways.replicate.requests()
        if r["path"].endswith(("/crisp", "/predictions"))
    )
    print(f"3 replicas, 50 concurrent: {codes.count(200)} served, {charged:.3f} USD charged")
    # The issue allows the budget plus one request in flight per replica; holds do better.
    assert charged <= budget + 1e-9, charged
    assert submitted == codes.count(200) and codes.count(200) >= 6
    for answer in answers:
        if answer.status_code == 429:
            assert answer.json()["error"]["code"] == "insufficient_quota", explain(answer)
    report = httpx.get(
        f"{replicas[1].url}/admin/spend?days=1", headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()
    (capped,) = [a for a in report["accounts"] if a["key_id"] == "capped"]
    assert capped["spend_usd"] == pytest.approx(charged)
    assert capped["requests"] == codes.count(200)


def test_price_and_breaker_reset_reach_every_replica(gateways: Gateways) -> None:
    first, second = gateways.start(2, env={"GATEWAY_ADMIN_KEY": ADMIN})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    url = f"{first.url}/admin/providers/fal/price"
    assert httpx.put(url, json={"price_usd": 0.01}).status_code == 401
    bad = httpx.put(url, json={"price_usd": "cheap"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "price_usd"
    assert httpx.put(url, json={"price_usd": 0.01}, headers=admin).json()["price_usd"] == 0.01
    time.sleep(1.1)  # the other replica's one-second view expires
    answer = post(second)
    assert answer.headers["x-upscale-provider"] == "replicate"  # fal is now the dearer
    states = httpx.get(f"{second.url}/admin/providers", headers=admin).json()["data"]
    assert {s["provider"]: s["price_usd"] for s in states} == {"fal": 0.01, "replicate": 0.006}
    httpx.delete(url, headers=admin).raise_for_status()

    gateways.fal.faults(error_rate=1, error_status=500)
    for _ in range(3):
        post(first)
    states = httpx.get(f"{second.url}/admin/providers", headers=admin).json()["data"]
    assert {s["provider"]: s["circuit"] for s in states}["fal"] == "open"
    gateways.fal.faults()
    reset = httpx.post(f"{second.url}/admin/providers/fal/reset", headers=admin)
    assert reset.json() == {"provider": "fal", "circuit": "closed"}
    time.sleep(1.1)
    assert post(first).headers["x-upscale-provider"] == "fal"
    logged = first.log_path.read_text() + second.log_path.read_text()
    for action in ('"set_price"', '"reset_price"', '"reset_breaker"'):
        assert action in logged


def test_identical_requests_on_two_replicas_share_one_provider_call(
    gateways: Gateways, tmp_path: Path
) -> None:
    shared = {"GATEWAY_RESULTS_DIR": str(tmp_path / "shared-results")}
    first, second = gateways.start(2, env=shared, sections={"cache": {"enabled": True}})
    gateways.fal.faults(latency_ms=800, jitter_ms=0)
    image = make_image(52, 44)

    def send(gateway: GatewayProcess) -> httpx.Response:
        return httpx.post(
            f"{gateway.url}/v1/images/edits",
            timeout=60,
            files={"image": ("a.png", image, "image/png")},
            data={"model": MODEL, "response_format": "b64_json"},
        )

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, [first, second] * 3))
    assert [a.status_code for a in answers] == [200] * 6
    assert len({a.json()["data"][0]["b64_json"] for a in answers}) == 1
    submits = [r for r in gateways.fal.requests() if r["path"].endswith("/crisp")]
    assert len(submits) == 1, [a.headers["x-upscale-cache"] for a in answers]
    later = send(second)  # a hit on the replica that did not run it
    assert later.headers["x-upscale-cache"] == "hit"


def post_idempotent(gateway: GatewayProcess, image: bytes, key: str) -> httpx.Response:
    """One upscale with an Idempotency-Key, as the SDK would send it (and retry it)."""
    return httpx.post(
        f"{gateway.url}/v1/images/edits",
        timeout=60,
        headers={"Idempotency-Key": key},
        files={"image": ("a.png", image, "image/png")},
        data={"model": MODEL, "response_format": "b64_json"},
    )


def test_a_retry_after_a_replica_dies_follows_the_job_it_submitted(gateways: Gateways) -> None:
    first, second = gateways.start(2, sections={"idempotency": {"lease_s": 2}})
    fal = gateways.fal
    fal.faults(latency_ms=2500, jitter_ms=0)
    image = make_image(44, 52)

    def send(gateway: GatewayProcess) -> httpx.Response:
        return post_idempotent(gateway, image, "retry-after-sigkill-1")

    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(send, first)
        time.sleep(1.0)  # fal has the job now
        assert first.proc is not None
        first.proc.kill()
        with pytest.raises(httpx.HTTPError):
            doomed.result()
    answer = send(second)  # the SDK's retry, through the balancer to the other replica
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-upscale-attempts"] == "fal=ok"
    submits = [r for r in fal.requests() if r["path"].endswith("/crisp")]
    assert len(submits) == 1  # followed, not submitted (and billed) again
    assert send(second).headers["idempotent-replayed"] == "true"


def test_a_slow_claimant_and_the_retry_that_took_over_bill_one_job_once(
    gateways: Gateways,
) -> None:
    """The claimant is alive but stalled (SIGSTOP) past its lease: the client's retry takes
    the claim over on the other replica and follows the journaled job. The claimant, once
    resumed, must neither bill that job again nor overwrite or free the new owner's claim."""
    first, second = gateways.start(
        2, env={"GATEWAY_ADMIN_KEY": ADMIN}, sections={"idempotency": {"lease_s": 1}}
    )
    fal = gateways.fal
    fal.faults(latency_ms=2000, jitter_ms=0)  # within fal's 3 s attempt, stall included
    image = make_image(46, 50)

    def send(gateway: GatewayProcess) -> httpx.Response:
        return post_idempotent(gateway, image, "slow-claimant-1")

    assert first.proc is not None
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(send, first)
        deadline = time.monotonic() + 10
        while not any(r["path"].endswith("/crisp") for r in fal.requests()):
            assert time.monotonic() < deadline, "fal never got the job"
            time.sleep(0.05)
        time.sleep(0.3)  # journaled
        first.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.6)  # past the 1 s lease
            retry = pool.submit(send, second)
            time.sleep(0.5)  # the retry has taken the claim over
        finally:
            first.proc.send_signal(signal.SIGCONT)
        answers = [slow.result(), retry.result()]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    submits = [r for r in fal.requests() if r["path"].endswith("/crisp")]
    assert len(submits) == 1  # followed, not submitted again
    spend = httpx.get(
        f"{second.url}/admin/spend", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    ).json()
    assert spend["spend_usd"] == 0.004, spend  # one job, charged once
    replay = send(second)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["data"] == answers[1].json()["data"]
