"""Results in an S3-compatible store (moto's server, a real process), through the official
`openai` SDK against real gateway processes on the emulated providers: two replicas share
one Redis and one bucket, one delivering presigned URLs, the other proxying. A URL, a cache
hit and an idempotent replay made on one are served by the other. A store that hangs or
stops is a retryable 503 `results_storage_unavailable` and `/readyz` degraded; work that
needs it is refused before a provider is paid; the retry of a request whose image was paid
for but could not be stored follows the provider job instead of buying another. After each
test the ledger equals the emulators' bills (conftest's reconciliation)."""

from __future__ import annotations

import base64
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import make_image
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.redis_server import RedisServer
from tests.integration.s3_server import S3Server
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
BUCKET = "gateway-results"
_sizes = itertools.count(40)


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    fal_emulator: Emulator,
    replicate_emulator: Emulator,
    redis_server: RedisServer,
    s3_server: S3Server,
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """(presigned, proxy): two replicas on one Redis key space and one bucket."""
    workdir = tmp_path_factory.mktemp("s3-replicas")
    s3_server.bucket(BUCKET)
    shared: dict[str, Any] = {
        "cache": {"enabled": True},
        "routing": {"redis_prefix": "s3results"},
    }
    configs = {
        delivery: write_config(
            workdir / f"{delivery}.yaml",
            results={"timeout_s": 3, "delivery": delivery},  # generous: a loaded machine
            **shared,
        )
        for delivery in ("presigned", "proxy")
    }
    # Clients reach the store as localhost; the gateways as 127.0.0.1 (compose: minio:9000).
    env = s3_server.env(
        BUCKET,
        "gw",
        REDIS_URL=redis_server.url,
        GATEWAY_RESULTS_PUBLIC_ENDPOINT=f"http://localhost:{s3_server.port}",
    )
    started: list[GatewayProcess] = []
    try:
        for delivery in ("presigned", "proxy"):
            started.append(
                start_gateway(workdir, fal_emulator, replicate_emulator, configs[delivery], **env)
            )
        yield started[0], started[1]
    finally:
        for process in started:
            process.stop()


def sdk(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="any", max_retries=0, timeout=60)


def edit(gateway: GatewayProcess, image: bytes, key: str | None = None, **extra: Any) -> Any:
    return sdk(gateway).images.with_raw_response.edit(
        model=MODEL,
        image=("a.png", image, "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2, **extra},
        extra_headers={"Idempotency-Key": key} if key else {},
    )


def submits(*emulators: Emulator) -> int:
    return sum(
        1 for e in emulators for r in e.requests() if r["path"].endswith(("/crisp", "/predictions"))
    )


def readiness(gateway: GatewayProcess, admin: bool = False) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {gateway.admin_key}"} if admin else {}
    body: dict[str, Any] = httpx.get(f"{gateway.url}/readyz", headers=headers, timeout=10).json()
    return body


def store_degraded_metric(gateway: GatewayProcess) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("upscale_results_store_degraded "))
    return float(line.split()[1])


def until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a state only another process can change (nothing to await here)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def url_of(answer: Any) -> str:
    url: str = answer.parse().data[0].url
    return url


def png(content: bytes) -> bool:
    return content.startswith(b"\x89PNG")


def test_presigned_url_is_fetched_straight_from_the_store(
    replicas: tuple[GatewayProcess, GatewayProcess],
    emulators: tuple[Emulator, Emulator],
    s3_server: S3Server,
) -> None:
    presigned, _ = replicas
    answer = edit(presigned, make_image(next(_sizes), 40))
    url = url_of(answer)
    parts = urlsplit(url)
    assert parts.netloc == f"localhost:{s3_server.port}"  # the public endpoint, not 127.0.0.1
    assert parts.path.startswith(f"/{BUCKET}/gw/cache/img_")
    assert "X-Amz-Expires=3600" in parts.query  # results.ttl_s
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and png(fetched.content)
    assert fetched.headers["content-type"] == "image/png"
    uncached = url_of(edit(presigned, make_image(next(_sizes), 40), cache=False))
    assert f"/{BUCKET}/gw/results/img_" in uncached
    assert png(httpx.get(uncached, timeout=10).content)


def test_a_proxied_url_streams_from_the_store_on_any_replica(
    replicas: tuple[GatewayProcess, GatewayProcess], emulators: tuple[Emulator, Emulator]
) -> None:
    presigned, proxy = replicas
    url = url_of(edit(proxy, make_image(next(_sizes), 40)))
    assert url.startswith(f"{proxy.url}/v1/files/img_")
    here = httpx.get(url, timeout=10)
    assert here.status_code == 200 and png(here.content)
    assert here.headers["content-length"] == str(len(here.content))
    assert here.headers["cache-control"] == "private, max-age=3600"
    there = httpx.get(url.replace(proxy.url, presigned.url), timeout=10)  # the other replica
    assert there.status_code == 200 and there.content == here.content
    head = httpx.head(url, timeout=10)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(here.content))
    assert head.content == b""
    missing = url.replace("/img_", "/img_x", 1)  # signature no longer matches: refused
    assert httpx.get(missing, timeout=10).status_code == 401


def test_a_cache_hit_made_on_one_replica_is_served_by_the_other(
    replicas: tuple[GatewayProcess, GatewayProcess], emulators: tuple[Emulator, Emulator]
) -> None:
    presigned, proxy = replicas
    image = make_image(next(_sizes), 40)
    before = submits(*emulators)
    first = edit(presigned, image)
    assert first.headers["x-upscale-cache"] == "miss"
    made = httpx.get(url_of(first), timeout=10).content
    inline = edit(proxy, image, response_format="b64_json")  # read back from the store
    assert inline.headers["x-upscale-cache"] == "hit"
    assert inline.headers["x-upscale-cost-usd"] == "0.000000"
    assert base64.b64decode(inline.parse().data[0].b64_json) == made
    linked = edit(proxy, image)
    assert linked.headers["x-upscale-cache"] == "hit"
    assert httpx.get(url_of(linked), timeout=10).content == made
    assert submits(*emulators) - before == 1


def test_an_idempotent_replay_made_on_one_replica_is_served_by_the_other(
    replicas: tuple[GatewayProcess, GatewayProcess], emulators: tuple[Emulator, Emulator]
) -> None:
    presigned, proxy = replicas
    key, image = str(uuid.uuid4()), make_image(next(_sizes), 40)
    before = submits(*emulators)
    first = edit(presigned, key=key, image=image)
    again = edit(proxy, key=key, image=image)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-upscale-cost-usd"] == "0.000000"
    made = httpx.get(url_of(first), timeout=10).content
    assert png(made) and httpx.get(url_of(again), timeout=10).content == made
    assert submits(*emulators) - before == 1


def test_a_hung_store_is_a_503_and_the_retry_pays_nothing_more(
    replicas: tuple[GatewayProcess, GatewayProcess],
    emulators: tuple[Emulator, Emulator],
    s3_server: S3Server,
) -> None:
    presigned, proxy = replicas
    key, image = str(uuid.uuid4()), make_image(next(_sizes), 40)
    before = submits(*emulators)
    s3_server.pause()  # accepts connections, answers nothing: every call runs into its timeout
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            edit(presigned, key=key, image=image)
        assert failed.value.status_code == 503
        assert failed.value.code == "results_storage_unavailable"
        assert failed.value.response.headers["x-should-retry"] == "true"
        paid = submits(*emulators)
        assert paid - before == 1  # the provider was paid; the image could not be kept
        ready = readiness(presigned)
        assert ready["status"] == "degraded" and ready["results_store"]["ok"] is False
        assert ready["results_store"]["kind"] == "s3" and ready["results_store"]["detail"] == ""
        assert readiness(presigned, admin=True)["results_store"]["detail"]  # the admin's only
        assert store_degraded_metric(presigned) == 1  # deploy/alerts.yml UpscaleResultsStoreDown
        # Known down: work that needs the store is refused before any provider is paid.
        with pytest.raises(openai.APIStatusError) as refused:
            edit(presigned, make_image(next(_sizes), 40))
        assert refused.value.code == "results_storage_unavailable"
        with pytest.raises(openai.APIStatusError):
            edit(presigned, key=key, image=image)
        assert submits(*emulators) == paid
        # b64_json needs no store: answered, uncached.
        inline = edit(presigned, make_image(next(_sizes), 40), response_format="b64_json")
        assert inline.headers["x-upscale-cache"] == "bypass"
        assert png(base64.b64decode(inline.parse().data[0].b64_json))
        paid = submits(*emulators)
    finally:
        s3_server.resume()
    until(lambda: readiness(presigned)["status"] == "ready")
    assert store_degraded_metric(presigned) == 0
    # The retry, on the other replica, follows the job already paid for.
    retried = edit(proxy, key=key, image=image)
    assert png(httpx.get(url_of(retried), timeout=10).content)
    assert submits(*emulators) == paid
    replayed = edit(presigned, key=key, image=image)
    assert replayed.headers["idempotent-replayed"] == "true"
    assert submits(*emulators) == paid


def test_a_paid_url_result_waits_out_a_short_store_outage(
    replicas: tuple[GatewayProcess, GatewayProcess],
    emulators: tuple[Emulator, Emulator],
    s3_server: S3Server,
) -> None:
    """No Idempotency-Key, so nothing a retry could follow: once the provider billed the
    image, the gateway keeps trying to store it (within PAID_PUT_S) rather than answer a
    503 whose retry (the SDK's own) pays for it again."""
    presigned, _ = replicas
    assert store_degraded_metric(presigned) == 0
    before = submits(*emulators)
    # Hung before the request: not yet known down, so the request runs (a miss asks the
    # store nothing before the provider), the provider bills, and the put hangs, fails
    # and marks the store down; the store comes back while the gateway retries the put.
    s3_server.pause()
    with ThreadPoolExecutor(1) as pool:
        try:
            answer = pool.submit(
                lambda: OpenAI(
                    base_url=f"{presigned.url}/v1", api_key="any", timeout=90
                ).images.with_raw_response.edit(  # the SDK's default two retries
                    model=MODEL,
                    image=("a.png", make_image(next(_sizes), 40), "image/png"),
                    prompt="x",
                )
            )
            until(lambda: store_degraded_metric(presigned) == 1)  # a put failed after payment
        finally:
            s3_server.resume()
        result = answer.result(timeout=90)
    assert result.http_response.status_code == 200
    assert png(httpx.get(url_of(result), timeout=10).content)
    assert submits(*emulators) - before == 1  # paid once


def test_a_stopped_store_is_a_503_until_it_is_back(
    replicas: tuple[GatewayProcess, GatewayProcess],
    emulators: tuple[Emulator, Emulator],
    s3_server: S3Server,
) -> None:
    """Last in the module: the restarted server is empty (its buckets are made again)."""
    presigned, _ = replicas
    assert readiness(presigned)["status"] == "ready"
    s3_server.stop()
    try:
        # Not yet known down: a b64_json miss is paid for, its cache entry cannot be stored,
        # and it is answered inline (a 503 would make the client's retry pay again).
        before = submits(*emulators)
        inline = edit(presigned, make_image(next(_sizes), 40), response_format="b64_json")
        assert inline.headers["x-upscale-cache"] == "bypass"
        assert png(base64.b64decode(inline.parse().data[0].b64_json))
        assert submits(*emulators) - before == 1
        ready = readiness(presigned)
        assert ready["status"] == "degraded" and ready["results_store"]["ok"] is False
        before = submits(*emulators)
        with pytest.raises(openai.APIStatusError) as refused:
            edit(presigned, make_image(next(_sizes), 40))
        assert refused.value.status_code == 503
        assert refused.value.code == "results_storage_unavailable"
        assert submits(*emulators) == before
    finally:
        s3_server.start()
    until(lambda: readiness(presigned)["status"] == "ready")
    answer = edit(presigned, make_image(next(_sizes), 40))
    assert png(httpx.get(url_of(answer), timeout=10).content)
