"""One contract for both result stores: the local directory and S3 (moto's server, a real
process on a free port). Time is the test's own clock, handed to the store: S3 cannot
backdate an object, and a test must not wait an hour for one to expire."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.errors import ResultsUnavailable
from gateway.results import FileResultStore, ResultStore
from gateway.results.base import ID
from gateway.results.s3 import S3ResultStore, s3_client
from tests.integration.s3_server import REGION, S3Server
from tests.integration.servers import free_port

pytestmark = pytest.mark.anyio
TTL_S = 3600
_buckets = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


Factory = Callable[[], ResultStore]


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.bucket(f"contract-{next(_buckets)}")


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # obstore reads its credentials from the environment, as the gateway's does.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")


def _s3(endpoint: str, bucket: str, prefix: str, clock: Clock, timeout_s: float = 5.0) -> Factory:
    def make() -> ResultStore:
        client = s3_client(
            bucket,
            prefix,
            endpoint=endpoint,
            region=REGION,
            timeout_s=timeout_s,
            stream_timeout_s=30,
        )
        return S3ResultStore(
            client, "results", TTL_S, 1 << 30, timeout_s=timeout_s, location=bucket, clock=clock
        )

    return make


@pytest.fixture(params=["local", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(
    kind: str, tmp_path: Path, clock: Clock, request: pytest.FixtureRequest
) -> Iterator[Factory]:
    """Stores on one location: each call is another replica's view of it."""
    if kind == "local":
        root = tmp_path / "results"
        yield lambda: FileResultStore(root, TTL_S, 1 << 30, clock=clock)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("bucket")
    yield _s3(server.url, bucket, f"t-{uuid.uuid4().hex[:12]}", clock)


async def _started(make: Factory) -> ResultStore:
    store = make()
    await store.start()
    return store


async def _body(store: ResultStore, file_id: str) -> bytes | None:
    blob = await store.open_blob(file_id)
    if blob is None:
        return None
    if blob.path is not None:
        return blob.path.read_bytes()
    assert blob.chunks is not None
    return b"".join([chunk async for chunk in blob.chunks])


async def test_put_and_get_round_trip(make: Factory) -> None:
    store = await _started(make)
    data = bytes(range(256)) * 5000  # over one streamed chunk
    file_id = await store.put(data, "webp")
    assert file_id.startswith("img_") and file_id.endswith(".webp")
    assert store.content_type(file_id) == "image/webp"
    assert await store.exists(file_id)
    assert await store.read(file_id) == data
    assert await _body(store, file_id) == data
    head = await store.open_blob(file_id, body=False)
    assert head is not None and head.size == len(data) and head.content_type == "image/webp"
    other = await _started(make)  # another replica on the same location
    assert await other.read(file_id) == data
    assert store.location == other.location and store.health.ok


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("png", "image/png"), ("jpeg", "image/jpeg"), ("gif", "image/gif"), ("avif", "image/avif")],
)
async def test_content_types(make: Factory, fmt: str, mime: str) -> None:
    store = await _started(make)
    file_id = await store.put(b"bytes", fmt)
    blob = await store.open_blob(file_id)
    assert blob is not None and blob.content_type == mime == store.content_type(file_id)


async def test_missing_and_foreign_ids(make: Factory) -> None:
    store = await _started(make)
    real = await store.put(b"data", "png")
    missing = "img_" + "A" * 32 + ".png"
    for file_id in (
        missing,
        "../etc/passwd",
        "img_x.exe",
        f"keep/{real}",
        f"cache/{real}",
        f"{real}/../{real}",
        real + ".part",
    ):
        assert not await store.exists(file_id), file_id
        assert await store.read(file_id) is None, file_id
        assert await store.open_blob(file_id) is None, file_id
        assert not await store.delete(file_id), file_id
        await store.keep(file_id, TTL_S)  # nothing to keep, and no error
    assert await store.read(real) == b"data"


async def test_delete(make: Factory) -> None:
    store = await _started(make)
    file_id = await store.put(b"data", "png")
    assert await store.delete(file_id)
    assert not await store.exists(file_id)
    assert await store.read(file_id) is None
    assert not await store.delete(file_id)


async def test_keep_outlives_the_sweep(make: Factory, clock: Clock) -> None:
    store = await _started(make)
    kept, plain = await store.put(b"kept", "png"), await store.put(b"plain", "png")
    await store.keep(kept, 24 * 3600)  # an idempotent replay's result: a day
    clock.now += TTL_S + 60
    assert await store.purge() == 1
    assert await store.exists(kept) and not await store.exists(plain)
    clock.now += 24 * 3600
    assert await store.purge() == 1
    assert not await store.exists(kept)


async def test_a_keep_written_while_a_sweep_lists_is_not_taken_for_an_orphan(
    make: Factory, clock: Clock, kind: str
) -> None:
    """The sweep lists in key order, blobs before markers: a replay's blob written behind the
    listing's position is missed, its marker written a moment later is seen. That marker
    must outlive the sweep, or the blob expires after results.ttl_s, not the replay's day."""
    store = await _started(make)
    if kind == "s3":
        listing = store._listing  # type: ignore[attr-defined]
        file_id = await store.put(b"replay", "png")

        async def behind() -> list[dict[str, object]]:
            return [m for m in await listing() if not str(m["path"]).endswith(file_id)]

        await store.keep(file_id, 24 * 3600)
        store._listing = behind  # type: ignore[attr-defined]
        await store.purge()
        store._listing = listing  # type: ignore[attr-defined]
    else:  # a directory is listed whole: nothing to race
        file_id = await store.put(b"replay", "png")
        await store.keep(file_id, 24 * 3600)
        await store.purge()
    clock.now += TTL_S + 60
    await store.purge()
    assert await store.exists(file_id)  # its marker kept it for the replay's day
    assert await store.read(file_id) == b"replay"
    assert ID.match(file_id) and not ID.match(file_id + "\n")  # no id ends in a newline


async def test_a_keep_of_a_cache_hit_restarts_its_lifetime(make: Factory, clock: Clock) -> None:
    store = await _started(make)
    file_id = await store.put(b"hit", "png")
    clock.now += TTL_S - 60
    await store.keep(file_id, TTL_S)  # a hit, just before it would have expired
    clock.now += 120
    await store.purge()
    assert await store.exists(file_id)


async def test_the_byte_cap_evicts_oldest_first(make: Factory) -> None:
    store = await _started(make)
    ids = [await store.put(b"x" * 300, "png") for _ in range(5)]
    for age, file_id in enumerate(ids):  # ids[0] the oldest, ids[4] the youngest
        await store.keep(file_id, TTL_S + age * 10)
    store.max_bytes = 1000
    assert await store.purge() == 2
    left = [i for i in ids if await store.exists(i)]
    assert left == ids[2:]  # 900 bytes: the three youngest
    await store.keep(ids[2], 7 * 24 * 3600)  # kept for a replay: now the youngest
    store.max_bytes = 1 << 30  # no trim of its own while the next one is put and aged
    ids.append(await store.put(b"x" * 300, "png"))
    await store.keep(ids[-1], TTL_S + 50)
    store.max_bytes = 1000
    assert await store.purge() == 1
    assert await store.exists(ids[2]) and not await store.exists(ids[3])
    assert await store.exists(ids[4]) and await store.exists(ids[5])
    await store.aclose()


async def test_a_pinned_replay_outlives_the_byte_cap(make: Factory, clock: Clock) -> None:
    """A replay's files were paid for: the byte cap evicts around them (a replay that
    found them gone would be a 410, and the client's retry with a new key pays again),
    and they go only when the replay's lifetime is over."""
    store = await _started(make)
    pinned = await store.put(b"x" * 300, "png")
    await store.pin(pinned, 7 * 24 * 3600)
    await store.keep(pinned, TTL_S)  # a later cache hit on it: still pinned, still a week
    clock.now += 10
    ids = [await store.put(b"x" * 300, "png") for _ in range(4)]
    for age, file_id in enumerate(ids):  # all younger than the pinned one
        await store.keep(file_id, TTL_S + age * 10)
    store.max_bytes = 1000
    assert await store.purge() == 2  # 1 500 bytes: the two oldest unpinned go
    assert await store.exists(pinned)
    assert [i for i in ids if await store.exists(i)] == ids[2:]
    clock.now += TTL_S + 3600
    assert await store.purge() == 2  # the others expired; the pin holds
    assert await store.read(pinned) == b"x" * 300
    clock.now += 7 * 24 * 3600
    assert await store.purge() == 1
    assert not await store.exists(pinned)
    await store.aclose()


async def test_pins_take_at_most_half_the_cap(make: Factory, clock: Clock) -> None:
    """Pinned bytes past half the cap: the pins that end soonest give way, so the store stays
    under its cap and a fresh result (a `url` just handed out) is not the one evicted."""
    store = await _started(make)
    pinned = []
    for n in range(4):  # 1 200 bytes pinned, ending one after another
        pinned.append(await store.put(b"x" * 300, "png", pin_s=3600 + n * 60))
        clock.now += 1
    fresh = await store.put(b"y" * 300, "png")
    store.max_bytes = 1200  # pins may take 600
    await store.purge()
    left = [i for i in pinned if await store.exists(i)]
    assert left == pinned[2:]  # the two pins ending soonest gave way, and went first
    assert await store.exists(fresh)
    await store.aclose()


async def test_a_blob_pinned_at_its_put_survives_a_sweep_right_after(make: Factory) -> None:
    store = await _started(make)
    store.max_bytes = 700  # pins may take 350
    file_id = await store.put(b"x" * 300, "png", pin_s=3600)  # the replay's file
    other = await store.put(b"y" * 500, "png")  # the put past the cap starts a trim
    await store.purge()
    assert await store.read(file_id) == b"x" * 300
    assert not await store.exists(other)
    await store.aclose()


async def test_sweeps_of_several_replicas_at_once_are_harmless(make: Factory, clock: Clock) -> None:
    first, second = await _started(make), await _started(make)
    ids = [await first.put(b"x" * 100, "png") for _ in range(6)]
    keep = ids[0]
    await first.keep(keep, 24 * 3600)
    clock.now += TTL_S + 60
    removed = await asyncio.gather(first.purge(), second.purge(), first.purge())
    assert all(n <= 5 for n in removed) and max(removed) >= 1
    assert [i for i in ids if await second.exists(i)] == [keep]
    assert await second.purge() == 0


async def test_presigned_urls_where_the_store_has_them(make: Factory, kind: str) -> None:
    store = await _started(make)
    file_id = await store.put(b"\x89PNG-signed", "png")
    urls = await store.presign([file_id], 60)
    if kind == "local":
        assert urls is None  # only the gateway serves a directory
        return
    assert urls is not None and len(urls) == 1
    async with httpx.AsyncClient(timeout=10) as http:
        fetched = await http.get(urls[0])
    assert fetched.status_code == 200 and fetched.content == b"\x89PNG-signed"
    assert fetched.headers["content-type"] == "image/png"


async def test_a_store_that_does_not_answer_is_a_clear_503(
    kind: str, tmp_path: Path, clock: Clock, bucket: str
) -> None:
    if kind == "local":
        blocker = tmp_path / "not-a-dir"
        blocker.write_bytes(b"")
        store: ResultStore = FileResultStore(blocker, TTL_S, clock=clock)
    else:  # nothing listens there
        store = _s3(f"http://127.0.0.1:{free_port()}", bucket, "x", clock, timeout_s=2)()
    assert not await store.ping()
    assert not store.health.ok and store.health.last_error
    with pytest.raises(ResultsUnavailable) as err:
        await store.put(b"data", "png")
    assert err.value.status == 503 and err.value.code == "results_storage_unavailable"
    assert not store.health.ok
