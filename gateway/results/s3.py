"""Results in an S3-compatible bucket (AWS S3, MinIO, R2, GCS interop), through obstore (the
Rust object_store crate: native async calls, presigned URLs, the standard AWS_* variables).
Every replica pointed at one bucket and prefix serves every result, cache blob and replay.

Layout under the store's prefix (`GATEWAY_RESULTS_URL=s3://bucket/prefix`):

    results/img_<id>.png                  a result (response_format=url, a replay's files)
    results/keep/img_<id>.png/<ms>        kept until <ms> + ttl: a cache hit
    results/pin/img_<id>.png/<ms>         pinned until <ms>: a replay's, out of the cap's reach
    cache/img_<id>.png, cache/keep/...    the result cache's blobs, under their own cap

S3 cannot move an object's last-modified time, so `keep` writes an empty marker whose name
carries the new reference time; the sweep lists the prefix once, takes each blob's latest
marker, and deletes by that time (expired, then the oldest past the byte cap). Sweeps of
several replicas at once decide alike from the same listing (ties broken by key) and delete
idempotently, so running them together is harmless. Bucket lifecycle rules may be added on
top (expire `results/` after a day, say); they are not needed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from gateway.results.base import (
    ID,
    Blob,
    Held,
    StoreHealth,
    content_type,
    new_id,
    sweep_loop,
    to_evict,
    unavailable,
)

log = logging.getLogger("gateway.results")
T = TypeVar("T")
CHUNK = 1 << 20  # proxy delivery streams in 1 MiB chunks: bounded memory per download
_KEEP = "keep/"
_PIN = "pin/"
# Errors that mean the store did not answer as a store (not "no such object").
_FAULTS = (BaseError, OSError)  # OSError: TimeoutError, connection errors


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without slashes at its ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("GATEWAY_RESULTS_URL must look like s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def s3_client(
    bucket: str,
    prefix: str,
    *,
    endpoint: str | None,
    region: str | None,
    timeout_s: float,
    stream_timeout_s: float,
) -> S3Store:
    """One obstore client; credentials and other AWS_* settings come from the environment.
    `stream_timeout_s` bounds a whole request (a proxied download that a slow client reads
    slowly); each call is also bounded by `timeout_s` from the caller's side."""
    config: dict[str, Any] = {}
    if endpoint:
        config["endpoint"] = endpoint.rstrip("/")
    if region:
        config["region"] = region
    client: dict[str, Any] = {
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
        "connect_timeout": timedelta(seconds=timeout_s),
        "timeout": timedelta(seconds=stream_timeout_s),
    }
    retry: dict[str, Any] = {
        "max_retries": 2,
        "retry_timeout": timedelta(seconds=timeout_s),
        "backoff": {
            "init_backoff": timedelta(milliseconds=50),
            "max_backoff": timedelta(seconds=1),
            "base": 2,
        },
    }
    return S3Store(
        bucket,
        prefix=prefix or None,
        config=config,  # type: ignore[arg-type]
        client_options=client,  # type: ignore[arg-type]
        retry_config=retry,  # type: ignore[arg-type]
    )


class S3ResultStore:
    kind = "s3"

    def __init__(
        self,
        client: S3Store,
        base: str,
        ttl_s: int,
        max_bytes: int,
        *,
        timeout_s: float = 10.0,
        health: StoreHealth | None = None,
        signer: S3Store | None = None,
        location: str = "",
        clock: Callable[[], float] = time.time,
    ):
        """`base`: the key prefix of this store's blobs ("results/", "cache/"); `signer`: the
        client presigned URLs are made with (its endpoint is the one clients reach)."""
        self._client = client
        self._signer = signer or client
        self._base = base.strip("/") + "/"
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.health = health or StoreHealth(self.kind)
        self._clock = clock
        self._location = hashlib.sha256(f"{location}|{self._base}".encode()).hexdigest()[:32]
        self._bytes = 0  # what the last sweep listed, plus this replica's puts since
        self._trimming: asyncio.Task[int] | None = None

    @property
    def location(self) -> str:
        return self._location

    @staticmethod
    def content_type(file_id: str) -> str | None:
        return content_type(file_id)

    def _key(self, file_id: str) -> str:
        return self._base + file_id

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """One store call, bounded; FileNotFoundError passes through (an absent object is
        an answer), any other failure marks the store down and is a 503."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await make()
        except FileNotFoundError:
            self.health.succeeded()
            raise
        except _FAULTS as exc:
            self.health.failed(exc)
            raise unavailable(exc) from exc
        self.health.succeeded()
        return result

    async def start(self) -> None:
        if not await self.ping():
            log.error("results store unreachable at start: %s", self.health.last_error)

    async def aclose(self) -> None:
        if self._trimming is not None:
            self._trimming.cancel()
            await asyncio.gather(self._trimming, return_exceptions=True)

    async def put(self, data: bytes, output_format: str, pin_s: float | None = None) -> str:
        file_id = new_id(output_format)
        if pin_s is not None:  # pinned before it exists: no sweep can catch it unpinned
            await self._pin(file_id, pin_s)
        attributes: Any = {
            "Content-Type": content_type(file_id) or "application/octet-stream",
            # what a presigned download tells caches (the proxy sends the same)
            "Cache-Control": f"private, max-age={self.ttl_s}",
        }
        await self._call(
            lambda: obstore.put_async(
                self._client,
                self._key(file_id),
                data,
                attributes=attributes,
                use_multipart=False,  # one bounded request; results are megabytes
            )
        )
        self._bytes += len(data)
        if self._bytes > self.max_bytes and (self._trimming is None or self._trimming.done()):
            self._trimming = asyncio.create_task(self.purge())
            self._trimming.add_done_callback(_quiet)
        return file_id

    async def _head(self, file_id: str) -> dict[str, Any] | None:
        if not ID.match(file_id):
            return None
        try:
            meta = await self._call(lambda: obstore.head_async(self._client, self._key(file_id)))
        except FileNotFoundError:
            return None
        return dict(meta)

    async def exists(self, file_id: str) -> bool:
        return await self._head(file_id) is not None

    async def read(self, file_id: str) -> bytes | None:
        if not ID.match(file_id):
            return None

        async def whole() -> bytes:
            got = await obstore.get_async(self._client, self._key(file_id))
            return bytes(await got.bytes_async())

        try:
            return await self._call(whole)
        except FileNotFoundError:
            return None

    async def open_blob(self, file_id: str, *, body: bool = True) -> Blob | None:
        kind = content_type(file_id)
        if kind is None:
            return None
        if not body:
            meta = await self._head(file_id)
            return None if meta is None else Blob(int(meta["size"]), kind)
        try:
            got = await self._call(lambda: obstore.get_async(self._client, self._key(file_id)))
        except FileNotFoundError:
            return None
        return Blob(int(got.meta["size"]), kind, chunks=self._chunks(got))

    async def _chunks(self, got: Any) -> AsyncIterator[bytes]:
        stream = got.stream(min_chunk_size=CHUNK)
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):  # each chunk; not the whole body
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
            except _FAULTS as exc:  # mid-body: the response is cut off, never completed
                # This download's failure, not the store's: a client that reads slowly
                # can outlast the store's idle timeout, and must not mark the store down
                # for everyone (the next call of any request tells if it is).
                log.warning("a proxied download broke off: %s", type(exc).__name__)
                raise unavailable(exc) from exc
            yield chunk

    async def keep(self, file_id: str, for_s: float) -> None:
        if not ID.match(file_id):
            return
        when = self._clock() + max(0.0, for_s - self.ttl_s)
        marker = f"{self._base}{_KEEP}{file_id}/{int(when * 1000)}"
        await self._call(lambda: obstore.put_async(self._client, marker, b"", use_multipart=False))

    async def pin(self, file_id: str, for_s: float) -> None:
        """Keep it `for_s` from now, and out of the byte cap's reach until then."""
        if ID.match(file_id):
            await self._pin(file_id, for_s)

    async def _pin(self, file_id: str, for_s: float) -> None:
        marker = f"{self._base}{_PIN}{file_id}/{int((self._clock() + for_s) * 1000)}"
        await self._call(lambda: obstore.put_async(self._client, marker, b"", use_multipart=False))

    async def delete(self, file_id: str) -> bool:
        if await self._head(file_id) is None:
            return False
        await self._call(lambda: obstore.delete_async(self._client, self._key(file_id)))
        return True  # its keep markers, orphaned, go with the next sweep

    async def _listing(self) -> list[dict[str, Any]]:
        stream = obstore.list(self._client, self._base.rstrip("/"), chunk_size=1000)
        objects: list[dict[str, Any]] = []
        while True:
            try:
                page = await self._call(stream.__anext__)
            except StopAsyncIteration:
                return objects
            objects.extend(dict(meta) for meta in page)

    async def purge(self) -> int:
        now = self._clock()
        cutoff = now - self.ttl_s
        blobs: dict[str, tuple[float, int]] = {}  # file id -> (reference time, size)
        markers: dict[str, list[tuple[float, str]]] = {}
        pins: dict[str, list[tuple[float, str]]] = {}  # file id -> (pinned until, key)
        for meta in await self._listing():
            rest = str(meta["path"])[len(self._base) :]
            for kind, into in ((_KEEP, markers), (_PIN, pins)):
                if rest.startswith(kind):
                    file_id, _, stamp = rest[len(kind) :].partition("/")
                    with contextlib.suppress(ValueError):
                        into.setdefault(file_id, []).append((int(stamp) / 1000, str(meta["path"])))
                    break
            else:
                if ID.match(rest):
                    blobs[rest] = (meta["last_modified"].timestamp(), int(meta["size"]))
                # anything else under the prefix is not ours: left alone
        doomed: list[str] = []
        removed = 0
        for file_id, stamps in markers.items():
            stamps.sort()
            if file_id not in blobs:
                # Its blob is gone, or it was written after the listing passed its name (the
                # listing is in key order, blobs before markers): a marker goes only once it
                # has expired itself, or a replay's fresh marker would be lost with it.
                doomed += [path for stamp, path in stamps if stamp <= cutoff]
                continue
            doomed += [path for _, path in stamps[:-1]]  # superseded by its latest marker
        pinned_until: dict[str, float] = {}
        for file_id, stamps in pins.items():
            stamps.sort()
            doomed += [path for stamp, path in stamps if stamp <= now]  # ended
            if stamps[-1][0] > now:
                pinned_until[file_id] = stamps[-1][0]
        held: list[Held] = []
        for file_id, (modified, size) in blobs.items():
            stamps = markers.get(file_id, [])
            reference = max([modified, *(t for t, _ in stamps)])
            until = pinned_until.get(file_id, 0.0)
            if not until and reference < cutoff:
                doomed += [self._key(file_id), *(p for _, p in stamps[-1:])]
                removed += 1
            else:
                held.append(Held(reference, file_id, size, until))
        total = sum(h.size for h in held)
        for blob in to_evict(held, self.max_bytes, self._base):
            doomed += [self._key(blob.key), *(p for _, p in markers.get(blob.key, [])[-1:])]
            removed += 1
            total -= blob.size
        for start in range(0, len(doomed), 1000):
            batch = doomed[start : start + 1000]
            await self._call(lambda batch=batch: obstore.delete_async(self._client, batch))
        self._bytes = total
        return removed

    async def sweep_forever(self, every_s: float = 60.0) -> None:
        await sweep_loop(self, every_s)

    async def ping(self) -> bool:
        """A listing of an empty prefix: answers only if the bucket is there and the
        credentials are good."""
        try:
            await self._call(
                lambda: obstore.list_with_delimiter_async(self._client, self._base + "ping")
            )
        except Exception:
            return False
        return True

    async def presign(self, file_ids: Sequence[str], expires_s: int) -> list[str] | None:
        keys = [self._key(f) for f in file_ids]
        if not keys:
            return []
        signed = await self._call(
            lambda: obstore.sign_async(self._signer, "GET", keys, timedelta(seconds=expires_s))
        )
        return list(signed)


def _quiet(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("results trim failed: %s", task.exception())
