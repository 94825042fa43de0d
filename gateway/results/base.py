"""What every result store is: blobs named by an id the gateway made, each with a time to
live, kept under a byte cap, and a shared view of whether the store answers.

    store = FileResultStore("var/results", ttl_s=3600)      # or S3ResultStore(...)
    await store.start()
    file_id = await store.put(png_bytes, "png")             # img_<random>.png
    blob = await store.open_blob(file_id)                   # None: not ours, or gone
    await store.keep(file_id, 3600)                         # a cache hit: used again
    await store.pin(file_id, 86400)                         # an idempotent replay's result
    await store.purge()                                     # expired, then oldest past the cap
                                                            # (pinned ones only once unpinned)

Every call is bounded in time; a store that cannot answer raises `ResultsUnavailable`
(503 `results_storage_unavailable`) and marks its `StoreHealth` down, so the service can
refuse work that needs the store before a provider is paid for it."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.errors import ResultsUnavailable
from gateway.imaging import CONTENT_TYPES

log = logging.getLogger("gateway.results")

# \Z, not $: `$` also matches before a trailing newline.
ID = re.compile(r"^img_[A-Za-z0-9_-]{22,64}\.(png|jpeg|gif|webp|avif)\Z")


def new_id(output_format: str) -> str:
    return f"img_{secrets.token_urlsafe(24)}.{output_format}"


def content_type(file_id: str) -> str | None:
    """The id's image type; None for an id the gateway never makes (a path, a marker)."""
    match = ID.match(file_id)
    return CONTENT_TYPES[match[1]] if match else None


def unavailable(exc: BaseException | None = None) -> ResultsUnavailable:
    detail = f" ({type(exc).__name__})" if exc is not None else ""
    return ResultsUnavailable(
        f"The gateway's result storage is not answering{detail}; retry shortly, or ask for "
        "response_format=b64_json.",
        code="results_storage_unavailable",
        headers={"retry-after": "1"},
    )


@dataclass(slots=True)
class Blob:
    """One stored result: a local file to send (`path`), or bounded chunks to stream."""

    size: int
    content_type: str
    path: Path | None = None
    chunks: AsyncIterator[bytes] | None = None


class StoreHealth:
    """Whether the store answered its last call; shared by the stores on one backend (the
    results and the cache's), so one failure is seen by both. `recovered` is set when a
    probe gets through again."""

    def __init__(self, kind: str):
        self.kind = kind
        self.ok = True
        self.last_error = ""
        self.changed_at = time.monotonic()
        self.answered_at = 0.0  # when a call last got an answer (monotonic)
        self._down = asyncio.Event()
        self._probe: asyncio.Task[bool] | None = None
        # Told `ok` on every change (the metrics' gauge); never on a repeat of the same state.
        self.on_change: Callable[[bool], None] | None = None

    async def check(self, ping: Callable[[], Awaitable[bool]], max_age_s: float = 2.0) -> bool:
        """Whether the store answers, for /readyz: what a call within `max_age_s` saw, else
        one probe shared by every caller meanwhile. A probe of a hung store takes up to the
        store's timeout, and anyone may call /readyz: its callers must not each send one."""
        if not self.ok:
            return False  # its own probe (recover_forever) watches for its return
        if time.monotonic() - self.answered_at < max_age_s:
            return True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(ping())
        return await asyncio.shield(self._probe)

    def failed(self, exc: BaseException) -> None:
        if self.ok:
            log.error("results store (%s) unavailable: %s", self.kind, _short(exc))
            self.changed_at = time.monotonic()
            self._tell(False)
        self.ok = False
        self.last_error = _short(exc)
        self._down.set()

    def succeeded(self) -> None:
        self.answered_at = time.monotonic()
        if not self.ok:
            log.warning("results store (%s) answers again", self.kind)
            self.changed_at = time.monotonic()
            self._tell(True)
        self.ok = True
        self.last_error = ""
        self._down.clear()

    def _tell(self, ok: bool) -> None:
        if self.on_change is not None:
            self.on_change(ok)

    async def wait_down(self) -> None:
        await self._down.wait()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class ResultStore(Protocol):
    kind: str  # "local" or "s3"
    ttl_s: int
    max_bytes: int
    health: StoreHealth

    @property
    def location(self) -> str:
        """Names where the blobs are: replicas that read the same location share them."""
        ...

    async def start(self) -> None:
        """Make ready (a directory, a first probe); never fails on a store that is down."""
        ...

    async def aclose(self) -> None: ...

    async def put(self, data: bytes, output_format: str, pin_s: float | None = None) -> str:
        """Store a result; its new id. Raises ResultsUnavailable. `pin_s`: pinned from the
        start (see `pin`), so that no sweep in between evicts it."""
        ...

    async def exists(self, file_id: str) -> bool: ...

    async def read(self, file_id: str) -> bytes | None:
        """The whole blob (for b64_json answers of stored results); None when absent."""
        ...

    async def open_blob(self, file_id: str, *, body: bool = True) -> Blob | None:
        """The blob to deliver (without its bytes when `body` is false: a HEAD)."""
        ...

    async def keep(self, file_id: str, for_s: float) -> None:
        """Keep it at least `for_s` from now (a cache hit: the byte cap may still evict it,
        least recently used first)."""
        ...

    async def pin(self, file_id: str, for_s: float) -> None:
        """Keep it `for_s` from now, out of the byte cap's reach (an idempotent replay's
        file: paid for, and promised to the replay)."""
        ...

    async def delete(self, file_id: str) -> bool: ...

    async def purge(self) -> int:
        """Delete expired blobs, then the oldest until under 90 % of the byte cap."""
        ...

    async def sweep_forever(self, every_s: float = 60.0) -> None: ...

    async def ping(self) -> bool:
        """Whether the store answers now (bounded in time); updates `health`."""
        ...

    async def presign(self, file_ids: Sequence[str], expires_s: int) -> list[str] | None:
        """URLs the client can fetch the blobs from directly; None if the store cannot."""
        ...

    def content_type(self, file_id: str) -> str | None: ...


# Pinned blobs (idempotent replays' files) may take this share of a store's byte cap; past
# it the pins that end soonest no longer shield their blobs: the disk stays bounded, and
# a burst of keyed requests cannot push out every fresh result.
PIN_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class Held:
    """A blob as the sweep sees it: when it was last put or kept, and until when pinned."""

    reference: float
    key: str
    size: int
    pinned_until: float = 0.0


def to_evict(held: Sequence[Held], max_bytes: int, where: str) -> list[Held]:
    """The blobs the byte cap deletes: past the cap, unpinned ones, least recently kept first
    (ties by key: every replica decides alike), until the total is under 90 % of the cap.
    Pins take at most PIN_SHARE of the cap; past it, those that end soonest give way, and are
    evicted before any unpinned blob."""
    pinned = sorted((h for h in held if h.pinned_until), key=lambda h: (h.pinned_until, h.key))
    loose = [h for h in held if not h.pinned_until]
    pinned_bytes = sum(h.size for h in pinned)
    released: list[Held] = []
    while pinned and pinned_bytes > max_bytes * PIN_SHARE:
        released.append(pinned.pop(0))
        pinned_bytes -= released[-1].size
    total = pinned_bytes + sum(h.size for h in (*released, *loose))
    if total <= max_bytes:
        return []
    doomed: list[Held] = []
    # Pins past their share go first, so a burst of keyed requests cannot evict fresh results.
    for blob in [*released, *sorted(loose, key=lambda h: (h.reference, h.key))]:
        if total <= max_bytes * 0.9:
            break
        doomed.append(blob)
        total -= blob.size
    if any(blob.pinned_until for blob in doomed):
        log.warning(
            "results store %s: pinned bytes passed half the cap of %d, and replays' files "
            "were evicted (raise the cap, or shorten idempotency.ttl_s)",
            where,
            max_bytes,
        )
    return doomed


# How long the put of a result a provider already billed is retried while the store fails.
PAID_PUT_S = 15.0


async def put_paid(
    store: ResultStore,
    data: bytes,
    output_format: str,
    until: float | None,
    pin_s: float | None = None,
) -> str:
    """Store a result the provider already billed, retrying a store that fails until the
    monotonic deadline `until` (one for all of a request's images; None: one attempt): a
    503 here makes the client's retry pay for the image again when no Idempotency-Key lets
    it follow the job."""
    if until is None:
        return await store.put(data, output_format, pin_s)
    delay = 0.25
    while True:
        # Each attempt runs to the store's own timeout (a slow, healthy store must not fail
        # a paid image); `until` only says whether a failed one is tried again.
        try:
            return await store.put(data, output_format, pin_s)
        except ResultsUnavailable:
            if time.monotonic() + delay >= until:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def recover_forever(store: ResultStore, every_s: float = 0.5) -> None:
    """While the store is down, probe it, so it is known to be back without waiting for a
    request to try (requests that need it are refused while it is down)."""
    while True:
        await store.health.wait_down()
        while not store.health.ok:
            await store.ping()
            if not store.health.ok:
                await asyncio.sleep(every_s)


async def sweep_loop(store: ResultStore, every_s: float) -> None:
    while True:
        try:
            await store.purge()
        except ResultsUnavailable:
            pass  # logged by the health record; the next sweep tries again
        except Exception:
            log.exception("results sweep failed")
        await asyncio.sleep(every_s)
