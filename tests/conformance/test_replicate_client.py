"""The Replicate emulator as the official `replicate` 1.0.7 client sees it, over real loopback
sockets: what the client parsed (status, model, version, output, urls, metrics, errors' problem
fields) must be what Replicate's API reference promises. Raw HTTP is used only for what the
client drops (`deadline`, the `aborted` status its model lacks, headers) and for the bill."""

from __future__ import annotations

import base64
import hashlib
import io
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
import trustme
from PIL import Image
from pydantic.v1 import ValidationError
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput

from adapters.emulators import BackgroundServer, EmulatorConfig, FaultScript, create_replicate_app
from tests.conftest import make_image

TOKEN = "r8_conformance_token"
MODEL = "recraft-ai/recraft-crisp-upscale"
PRICE_MICROS = 6000  # Replicate's list price for one prediction, 0.006 USD
QUICK = {"latency_ms": 100, "jitter_ms": 0}  # short, so the module stays fast
THROTTLED = "Request was throttled. Your rate limit resets in ~30s."


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def when(stamp: str | None) -> datetime:
    assert stamp is not None
    return datetime.fromisoformat(stamp)


def seconds_between(start: str | None, end: str | None) -> float:
    return (when(end) - when(start)).total_seconds()


def webp(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP"
    return image.size


@dataclass
class Emulator:
    url: str
    admin: httpx.Client  # admin routes and raw API calls, with the token

    def faults(self, **script: Any) -> None:
        self.admin.put("/_emulator/faults", json={**QUICK, **script}).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.admin.get("/_emulator/requests").json()["requests"]
        return records

    def bill(self) -> dict[str, Any]:
        body: dict[str, Any] = self.admin.get("/_emulator/jobs").json()
        return body

    def billed(self, prediction_id: str) -> bool:
        (job,) = [j for j in self.bill()["jobs"] if j["id"] == prediction_id]
        return bool(job["billed"])

    def raw(self, prediction_id: str) -> dict[str, Any]:
        response = self.admin.get(f"/v1/predictions/{prediction_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def settle(self, prediction_id: str, timeout_s: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (body := self.raw(prediction_id))["status"] in ("starting", "processing"):
            assert time.monotonic() < deadline, f"prediction did not end: {body}"
            time.sleep(0.05)
        return body


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    config = EmulatorConfig(api_key=TOKEN, faults=FaultScript(**QUICK))
    with (
        BackgroundServer(create_replicate_app(config)) as server,
        httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        ) as admin,
    ):
        yield Emulator(server.url, admin)


@pytest.fixture(autouse=True)
def reset(emulator: Emulator) -> None:
    emulator.faults()
    emulator.admin.delete("/_emulator/requests").raise_for_status()


Connect = Callable[..., replicate.Client]


@pytest.fixture
def connect(emulator: Emulator) -> Iterator[Connect]:
    """Clients of the emulator, on transports of ours so their connections close with the
    test (the client has no close of its own). Keyword arguments go to `replicate.Client`."""
    transports: list[httpx.HTTPTransport] = []

    def make(api_token: str = TOKEN, **kwargs: Any) -> replicate.Client:
        transports.append(transport := httpx.HTTPTransport())
        client = replicate.Client(
            api_token=api_token, base_url=emulator.url, transport=transport, **kwargs
        )
        client.poll_interval = 0.05  # the client's own polling (Prediction.wait, run)
        return client

    yield make
    for transport in transports:
        transport.close()


@pytest.fixture
def client(connect: Connect) -> replicate.Client:
    return connect()


def deadline_client(connect: Connect, cancel_after: str) -> replicate.Client:
    """The client has no Cancel-After argument; its httpx headers carry one instead."""
    return connect(headers={"Cancel-After": cancel_after})


def test_create_with_wait_is_the_finished_prediction(
    client: replicate.Client, emulator: Emulator
) -> None:
    prediction = client.models.predictions.create(
        model=MODEL, input={"image": data_uri(make_image(64, 64))}, wait=5
    )
    assert prediction.status == "succeeded" and prediction.error is None
    assert prediction.model == MODEL
    assert prediction.version == "hidden"  # official models have no public versions
    url = f"{emulator.url}/v1/predictions/{prediction.id}"
    assert prediction.urls == {
        "get": url,
        "cancel": f"{url}/cancel",
        "web": f"https://replicate.com/p/{prediction.id}",
    }
    assert isinstance(prediction.output, str)
    assert prediction.output.startswith(f"{emulator.url}/delivery/")
    assert webp(httpx.get(prediction.output).content) == (256, 256)
    created, started, completed = (
        prediction.created_at,
        prediction.started_at,
        prediction.completed_at,
    )
    assert when(created) <= when(started) <= when(completed)
    metrics = prediction.metrics or {}
    assert metrics["predict_time"] == pytest.approx(seconds_between(started, completed), abs=2e-3)
    assert metrics["total_time"] == pytest.approx(seconds_between(created, completed), abs=2e-3)
    assert 0 < metrics["predict_time"] <= metrics["total_time"]
    assert "deadline" not in emulator.raw(prediction.id)  # no Cancel-After, no deadline
    (record,) = emulator.requests()
    assert record["headers"]["prefer"] == "wait=5"


def test_bare_prefer_wait_holds_the_request_until_the_prediction_ends(
    client: replicate.Client, emulator: Emulator
) -> None:
    emulator.faults(latency_ms=1500)
    began = time.monotonic()
    prediction = client.models.predictions.create(
        model=MODEL, input={"image": data_uri(make_image())}, wait=True
    )
    assert prediction.status == "succeeded" and isinstance(prediction.output, str)
    assert time.monotonic() - began >= 1.4  # answered by the create, not by polling
    (record,) = emulator.requests()
    assert record["headers"]["prefer"] == "wait"  # what wait=True sends: up to 60 s


@pytest.mark.parametrize(
    ("latency_ms", "status"),
    # 30% of the service time is queue: at 1 s the first is still queued, the second running.
    [(5000, "starting"), (2000, "processing")],
)
def test_a_wait_that_runs_out_answers_the_prediction_as_it_is(
    client: replicate.Client, emulator: Emulator, latency_ms: int, status: str
) -> None:
    emulator.faults(latency_ms=latency_ms)
    prediction = client.models.predictions.create(
        model=MODEL, input={"image": data_uri(make_image())}, wait=1
    )
    assert prediction.status == status
    assert prediction.output is None and prediction.completed_at is None
    assert (prediction.started_at is not None) == (status == "processing")
    assert client.predictions.cancel(prediction.id).status == "canceled"


@pytest.mark.anyio
async def test_async_create_get_and_cancel(emulator: Emulator) -> None:
    transport = httpx.AsyncHTTPTransport()  # ours, so the pool is closed in this loop
    client = replicate.Client(api_token=TOKEN, base_url=emulator.url, transport=transport)
    try:
        created = await client.models.predictions.async_create(
            model=MODEL, input={"image": data_uri(make_image(32, 32))}, wait=5
        )
        assert created.status == "succeeded" and created.version == "hidden"
        fetched = await client.predictions.async_get(created.id)
        assert fetched.dict() == created.dict()
        # Cancelling a prediction that has ended changes nothing.
        after = await client.predictions.async_cancel(created.id)
        assert after.status == "succeeded" and after.output == created.output
        async with httpx.AsyncClient() as http:
            assert webp((await http.get(str(created.output))).content) == (128, 128)
    finally:
        await transport.aclose()


def test_create_without_wait_then_poll(client: replicate.Client, emulator: Emulator) -> None:
    emulator.faults(latency_ms=300)
    prediction = client.models.predictions.create(
        model=MODEL, input={"image": data_uri(make_image())}
    )
    assert prediction.status == "starting" and prediction.output is None
    assert prediction.started_at is None and "predict_time" not in (prediction.metrics or {})
    prediction.wait()  # the client polls urls.get through predictions.get
    assert prediction.status == "succeeded" and isinstance(prediction.output, str)
    fetched = client.predictions.get(prediction.id)
    assert fetched.id == prediction.id and fetched.output == prediction.output
    assert fetched.urls == prediction.urls and fetched.metrics == prediction.metrics
    (record,) = emulator.requests()
    assert "prefer" not in record["headers"]


def test_cancel_before_start_is_free_and_after_start_is_billed(
    client: replicate.Client, emulator: Emulator
) -> None:
    emulator.faults(latency_ms=4000)  # 1.2 s queued, then running
    queued = client.models.predictions.create(model=MODEL, input={"image": data_uri(make_image())})
    before = emulator.bill()["billed_micros"]
    canceled = client.predictions.cancel(queued.id)
    assert canceled.status == "canceled" and canceled.completed_at is not None
    assert canceled.started_at is None and "predict_time" not in (canceled.metrics or {})
    assert not emulator.billed(queued.id)

    running = client.models.predictions.create(model=MODEL, input={"image": data_uri(make_image())})
    deadline = time.monotonic() + 5
    while (running := client.predictions.get(running.id)).status == "starting":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert running.status == "processing" and running.started_at is not None
    canceled = client.predictions.cancel(running.id)
    assert canceled.status == "canceled" and canceled.started_at == running.started_at
    assert (canceled.metrics or {})["predict_time"] > 0  # it ran, and is paid for
    assert emulator.billed(running.id)
    assert emulator.bill()["billed_micros"] == before + PRICE_MICROS
    again = client.predictions.cancel(running.id)
    assert again.status == "canceled" and again.completed_at == canceled.completed_at


def test_cancel_after_aborts_a_starting_prediction_and_cancels_a_running_one(
    connect: Connect, emulator: Emulator
) -> None:
    client = deadline_client(connect, "5s")
    emulator.faults(latency_ms=20000)  # 6 s queued: still starting at the deadline
    waiting = client.models.predictions.create(model=MODEL, input={"image": data_uri(make_image())})
    emulator.faults(latency_ms=10000)  # 3 s queued: running at the deadline
    running = client.models.predictions.create(model=MODEL, input={"image": data_uri(make_image())})
    before = emulator.bill()["billed_micros"]
    for prediction in (waiting, running):
        assert prediction.status == "starting"
        raw = emulator.raw(prediction.id)
        assert seconds_between(raw["created_at"], raw["deadline"]) == pytest.approx(5, abs=1e-3)

    aborted = emulator.settle(waiting.id)
    assert aborted["status"] == "aborted" and aborted["started_at"] is None
    assert seconds_between(aborted["created_at"], aborted["completed_at"]) == pytest.approx(
        5, abs=0.5
    )
    with pytest.raises(ValidationError, match="status"):
        client.predictions.get(waiting.id)  # replicate 1.0.7's model has no `aborted`
    assert not emulator.billed(waiting.id)

    emulator.settle(running.id)
    canceled = client.predictions.get(running.id)
    assert canceled.status == "canceled" and canceled.started_at is not None
    assert seconds_between(canceled.created_at, canceled.completed_at) == pytest.approx(5, abs=0.5)
    assert (canceled.metrics or {})["predict_time"] == pytest.approx(2, abs=0.5)
    assert emulator.billed(running.id)  # it ran: Replicate bills a canceled prediction
    assert emulator.bill()["billed_micros"] == before + PRICE_MICROS


@pytest.mark.parametrize(
    ("cancel_after", "seconds"),
    [("5s", 5), ("30", 30), ("2m30s", 150), ("1h30m", 5400), ("1h30m45s", 5445), ("1.5h", 5400)],
)
def test_cancel_after_units_combine(
    connect: Connect, emulator: Emulator, cancel_after: str, seconds: int
) -> None:
    prediction = deadline_client(connect, cancel_after).models.predictions.create(
        model=MODEL, input={"image": data_uri(make_image(32, 32))}, wait=5
    )
    assert prediction.status == "succeeded"
    raw = emulator.raw(prediction.id)
    assert seconds_between(raw["created_at"], raw["deadline"]) == pytest.approx(seconds, abs=1e-3)


@pytest.mark.parametrize("cancel_after", ["4s", "4999ms", "0", "soon", "5 parsecs", "-10s"])
def test_cancel_after_under_five_seconds_or_unreadable_is_refused(
    connect: Connect, emulator: Emulator, cancel_after: str
) -> None:
    jobs = len(emulator.bill()["jobs"])
    with pytest.raises(ReplicateError) as raised:
        deadline_client(connect, cancel_after).models.predictions.create(
            model=MODEL, input={"image": data_uri(make_image(32, 32))}
        )
    assert raised.value.status == 422
    assert raised.value.detail and "Cancel-After" in raised.value.detail
    assert len(emulator.bill()["jobs"]) == jobs  # refused: no prediction, nothing to bill


def test_files_create_get_list_delete(client: replicate.Client, emulator: Emulator) -> None:
    png = make_image(64, 64)
    uploaded = client.files.create(
        io.BytesIO(png), filename="in.png", metadata={"purpose": "conformance"}
    )
    assert uploaded.name == "in.png" and uploaded.content_type == "image/png"
    assert uploaded.size == len(png)
    assert uploaded.checksums["sha256"] == hashlib.sha256(png).hexdigest()
    assert uploaded.metadata == {"purpose": "conformance"}
    assert uploaded.urls == {"get": f"{emulator.url}/v1/files/{uploaded.id}"}
    # Replicate's API reference shows a file expiring an hour after it was created.
    assert seconds_between(uploaded.created_at, uploaded.expires_at) == pytest.approx(3600)
    assert client.files.get(uploaded.id) == uploaded
    assert client.files.list()[0].id == uploaded.id  # newest first
    page = emulator.admin.get("/v1/files").json()
    assert page["next"] is None and page["previous"] is None
    assert page["results"][0]["id"] == uploaded.id

    prediction = client.models.predictions.create(
        model=MODEL, input={"image": uploaded.urls["get"]}, wait=5
    )
    assert prediction.status == "succeeded"
    assert webp(httpx.get(str(prediction.output)).content) == (256, 256)

    assert client.files.delete(uploaded.id) is True
    with pytest.raises(ReplicateError) as raised:
        client.files.get(uploaded.id)
    assert raised.value.status == 404
    assert uploaded.id not in [f.id for f in client.files.list()]


def test_run_over_http_gives_the_output_url_as_a_string(
    client: replicate.Client, emulator: Emulator
) -> None:
    output = client.run(MODEL, input={"image": data_uri(make_image(64, 48))})
    # FileOutput wraps https and data URLs only: an http delivery URL stays a str.
    assert type(output) is str and output.startswith(f"{emulator.url}/delivery/")
    assert webp(httpx.get(output).content) == (256, 192)
    (record,) = emulator.requests()
    assert record["headers"]["prefer"] == "wait"

    # A file handle as input: the client uploads it through the Files API first.
    emulator.admin.delete("/_emulator/requests").raise_for_status()
    output = client.run(MODEL, input={"image": io.BytesIO(make_image(32, 32))})
    assert type(output) is str and webp(httpx.get(output).content) == (128, 128)
    upload, created = emulator.requests()
    assert upload["path"] == "/v1/files"
    assert created["input"]["image"]["url"].startswith(f"{emulator.url}/v1/files/")


@pytest.fixture(scope="module")
def tls_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[replicate.Client]:
    """The emulator over https (a throwaway CA) and a client that trusts only that CA."""
    directory: Path = tmp_path_factory.mktemp("replicate-tls")
    ca = trustme.CA()
    server_pem = directory / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    app = create_replicate_app(EmulatorConfig(api_key=TOKEN, faults=FaultScript(**QUICK)))
    transport = httpx.HTTPTransport(verify=context)
    with BackgroundServer(app, ssl_certfile=str(server_pem)) as server:
        assert server.url.startswith("https://")
        client = replicate.Client(api_token=TOKEN, base_url=server.url, transport=transport)
        client.poll_interval = 0.05
        yield client
        transport.close()  # before the server stops, or it waits out its graceful timeout


def test_run_over_https_gives_a_file_output(tls_client: replicate.Client) -> None:
    output = tls_client.run(MODEL, input={"image": data_uri(make_image(48, 32))})
    assert isinstance(output, FileOutput)
    assert output.url.startswith("https://127.0.0.1:") and "/delivery/" in output.url
    assert webp(output.read()) == (192, 128)  # read through the client's own connection


def test_unauthenticated_is_401(connect: Connect) -> None:
    client = connect("r8_not_the_token")
    for call in (
        lambda: client.models.predictions.create(model=MODEL, input={"image": "x"}),
        lambda: client.predictions.get("anything"),
        lambda: client.files.list(),
    ):
        with pytest.raises(ReplicateError) as raised:
            call()
        assert raised.value.status == 401
        assert raised.value.title == "Unauthenticated"
        assert raised.value.detail == "You did not pass a valid authentication token"


def test_unknown_prediction_model_or_file_is_404(client: replicate.Client) -> None:
    for call in (
        lambda: client.predictions.get("nosuchprediction"),
        lambda: client.predictions.cancel("nosuchprediction"),
        lambda: client.models.predictions.create(model="someone/else", input={"image": "x"}),
        lambda: client.files.get("nosuchfile"),
    ):
        with pytest.raises(ReplicateError) as raised:
            call()
        assert raised.value.status == 404 and raised.value.detail


def test_missing_input_is_422(client: replicate.Client) -> None:
    with pytest.raises(ReplicateError) as raised:
        client.models.predictions.create(model=MODEL, input={})
    assert raised.value.status == 422
    assert raised.value.title == "Input validation failed"
    assert raised.value.detail and "image" in raised.value.detail


def test_throttled_is_429_in_the_documented_shape(
    client: replicate.Client, emulator: Emulator
) -> None:
    emulator.faults(rate_limit_rate=1, retry_after_s=30)
    with pytest.raises(ReplicateError) as raised:
        client.models.predictions.create(model=MODEL, input={"image": "x"})
    assert raised.value.status == 429 and raised.value.title is None
    assert raised.value.detail == THROTTLED
    raw = emulator.admin.post(f"/v1/models/{MODEL}/predictions", json={"input": {"image": "x"}})
    assert raw.status_code == 429 and raw.json() == {"detail": THROTTLED, "status": 429}
    assert raw.headers["content-type"].startswith("application/problem+json")
    assert "retry-after" not in raw.headers  # Replicate documents no Retry-After
