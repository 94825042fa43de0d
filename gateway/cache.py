"""The result cache, and coalescing of identical requests.

A result is named by a hash of the input's bytes, of every parameter that changes the
output (not `response_format`, `user` or routing preferences, which do not) and, unless
`cache.scope` is `shared`, of the client key's account: one key never learns what another
uploaded, nor gets its results free. The first request for a name claims it in the state
store (the same atomic claim as idempotency keys, so one claim holds across replicas) and
runs; identical requests that arrive meanwhile wait for it: on this replica through an
in-process future, on others by polling the claim. Its images are kept in the cache's own
file store (a size cap, least recently used first) and the claim then names them, and the
providers that made them, for `ttl_s`. A hit costs nothing.

A leader's failure is its own (a price cap, no fallbacks, a client that went away): the
requests waiting on it then run under their own preferences, one leading, the rest following
it. A hit must have been made by providers the request's `only`/`ignore` allow; otherwise
the request runs, and leaves the entry as it is.

The images live in the results store's `cache/` part, under `max_bytes`: each hit keeps
them (least recently used go first). With a shared store (`GATEWAY_RESULTS_URL`, or one
results directory) a hit made on any replica is served from the store by any other. A hit
whose files were evicted drops the entry (only while it still names those files) and runs as
the new leader, so the next repeat hits again; one whose files are on another replica's own
disk (local directories not shared) runs again rather than fail, and leaves the entry to
that replica. While the store is down, a hit cannot be read: the request is a retryable 503,
or, for b64_json, runs without the cache."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import orjson

from gateway.config import OutputConfig
from gateway.errors import ResultsUnavailable
from gateway.imaging import FinishedImage
from gateway.params import UpscaleParams
from gateway.results.base import ResultStore, put_paid
from gateway.routing.preferences import Preferences
from gateway.state.base import ClaimStore

log = logging.getLogger("gateway.cache")


def cache_key(image: bytes, params: UpscaleParams, output: OutputConfig, scope: str = "") -> str:
    """`scope`: the account whose cache it is, or "" for the one cache of every key."""
    digest = hashlib.sha256(image)
    shaping = {
        "scale_factor": params.scale_factor,
        "size": params.size,
        "output_format": params.output_format,
        "output_compression": params.output_compression,
        "n": params.n,
        "enable_safety_checker": params.enable_safety_checker,
        "output": output.model_dump(),  # default qualities shape the bytes too
    }
    if scope:
        shaping["scope"] = scope
    digest.update(orjson.dumps(shaping, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResult:
    files: tuple[str, ...]
    output_format: str
    size: str
    providers: tuple[str, ...]
    disk: str = ""  # the store's location (ResultStore.location); "" for entries made before it

    def dumps(self) -> str:
        return orjson.dumps(
            {
                "files": self.files,
                "output_format": self.output_format,
                "size": self.size,
                "providers": self.providers,
                "disk": self.disk,
            }
        ).decode()

    @classmethod
    def of(
        cls,
        files: Sequence[str],
        images: Sequence[FinishedImage],
        providers: Sequence[str],
        disk: str = "",
    ) -> CachedResult:
        first = images[0]
        size = f"{first.width}x{first.height}"
        return cls(tuple(files), first.output_format, size, tuple(providers), disk)

    @classmethod
    def loads(cls, text: str) -> CachedResult:
        raw = orjson.loads(text)
        return cls(
            tuple(raw["files"]),
            raw["output_format"],
            raw["size"],
            tuple(raw["providers"]),
            str(raw.get("disk", "")),
        )

    def allowed(self, prefs: Preferences | None) -> bool:
        """Whether every provider that made these images is one the request allows."""
        if prefs is None:
            return True
        return all(
            (prefs.only is None or p in prefs.only) and p not in prefs.ignore
            for p in self.providers
        )


class _LeaderGone(Exception):
    """The request that held the claim ended without a result: a bug in its caller."""


@dataclass(slots=True)
class Slot:
    """`entry` is set when the result exists (`kind` "hit" or "coalesced"); otherwise this
    request leads (`kind` "miss") and must `fill` it, or its failure frees the name."""

    kind: str
    entry: CachedResult | None
    key: str
    filled: CachedResult | None = None
    # The leader answered without storing (b64_json while the store is down): its name is
    # freed without an error, and whoever waits on it leads in turn.
    unfilled: bool = False
    # The leader's own token on the name's claim: a leader too slow to renew, whose name
    # another took over, can then neither fill nor free the new leader's claim.
    owner: str = ""


class ResultCache:
    def __init__(
        self,
        store: ClaimStore,
        files: ResultStore,
        ttl_s: float,
        lease_s: float,
        wait_s: float,
    ):
        self._store = store
        self.files = files
        self._ttl_s = ttl_s
        self._lease_s = lease_s  # a leader that died frees the name after this
        self._wait_s = wait_s
        # A leader on this replica, by name: its result, or None when it failed.
        self._local: dict[str, asyncio.Future[CachedResult | None]] = {}
        self._disk = files.location

    @property
    def disk(self) -> str:
        """Where the cached files are (shared by replicas on one store or directory)."""
        return self._disk

    @staticmethod
    def _claim_key(key: str) -> str:
        return f"cache:{key}"

    @contextlib.asynccontextmanager
    async def slot(self, key: str, prefs: Preferences | None = None) -> AsyncIterator[Slot]:
        """`prefs`: the request's routing preferences, which a result served to it must
        satisfy (None: any result)."""
        slot = await self._find(key, prefs)
        if slot.kind != "miss":  # a result to serve, or a run that leads nobody
            yield slot
            return
        future: asyncio.Future[CachedResult | None] = asyncio.get_running_loop().create_future()
        self._local[key] = future
        renewal = asyncio.create_task(self._renew(slot))
        try:
            yield slot
            if slot.filled is None and not slot.unfilled:
                raise _LeaderGone("the leading request returned without a result")
            if slot.filled is None:
                await asyncio.shield(
                    self._store.idem_release(self._claim_key(key), key, slot.owner)
                )
        except BaseException:
            # Its failure is its own: no follower sees it (nor shares its exception object);
            # each runs under its own preferences once the name is free.
            renewal.cancel()
            try:
                await asyncio.shield(
                    self._store.idem_release(self._claim_key(key), key, slot.owner)
                )
            finally:
                self._settle(key, future, None)
            raise
        finally:
            renewal.cancel()
        self._settle(key, future, slot.filled)

    async def _renew(self, slot: Slot) -> None:
        """Keep the leader's claim while it runs (image work may queue): a leader that is
        only slow is not taken over, and paid for twice."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            with contextlib.suppress(Exception):  # the next renewal may get through
                if not await self._store.idem_renew(
                    self._claim_key(slot.key), slot.key, self._lease_s, slot.owner
                ):
                    return

    def _settle(
        self, key: str, future: asyncio.Future[CachedResult | None], entry: CachedResult | None
    ) -> None:
        if self._local.get(key) is future:
            del self._local[key]
        if not future.done():
            future.set_result(entry)

    async def _find(self, key: str, prefs: Preferences | None) -> Slot:
        deadline = time.monotonic() + self._wait_s
        delay = 0.02
        dropped = False
        while True:
            local = self._local.get(key)
            if local is not None:
                entry = await asyncio.shield(local)
                if entry is None:
                    continue  # the leader failed for a reason of its own: lead, or follow anew
                if not entry.allowed(prefs):  # made by a provider this request excludes
                    return Slot("bypass", None, key)
                return Slot("coalesced", entry, key)
            owner = secrets.token_hex(12)
            claim = await self._store.idem_begin(self._claim_key(key), key, self._lease_s, owner)
            if claim.state in ("new", "takeover"):  # a leader that died leaves it to us
                return Slot("miss", None, key, owner=owner)
            if claim.state == "done":
                entry = CachedResult.loads(claim.response)
                if not entry.allowed(prefs):  # run it, and leave the entry to those it serves
                    return Slot("bypass", None, key)
                if await self._present(entry):
                    return Slot("hit", entry, key)
                if dropped or not self._disk or entry.disk not in ("", self._disk):
                    # On another replica's disk: run again, without the name.
                    return Slot("bypass", None, key)
                # Evicted here: drop the entry (unless it was filled again since it was
                # read), then look again: this request leads, or follows whoever does.
                await self._store.idem_drop(self._claim_key(key), key, claim.response)
                dropped = True
                continue
            if time.monotonic() + delay > deadline:
                return Slot("bypass", None, key)  # the leader elsewhere is too slow to wait on
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _present(self, entry: CachedResult) -> bool:
        for file_id in entry.files:
            if not await self.files.exists(file_id):
                return False
        for file_id in entry.files:  # a hit keeps them: least recently used go first
            await self.files.keep(file_id, self._ttl_s)
        return True

    async def fill(
        self,
        slot: Slot,
        images: Sequence[FinishedImage],
        providers: Sequence[str],
        retry_s: float = 0.0,
        pin_s: float | None = None,
    ) -> CachedResult:
        """Store the leader's images under the slot's name; a bypass stores them unnamed.
        `retry_s`: how long a failing store is retried (see results.put_paid); `pin_s`: the
        files are pinned that long from the start (an idempotent request's replay)."""
        until = time.monotonic() + retry_s if retry_s else None
        files = [await put_paid(self.files, i.data, i.output_format, until, pin_s) for i in images]
        entry = CachedResult.of(files, images, providers, self._disk)
        if slot.kind == "miss":
            await self._store.idem_finish(
                self._claim_key(slot.key), slot.key, entry.dumps(), self._ttl_s, slot.owner
            )
            slot.filled = entry
        return entry

    async def read(self, entry: CachedResult) -> list[bytes]:
        blobs = [await self.files.read(f) for f in entry.files]
        if any(b is None for b in blobs):
            raise ResultsUnavailable(
                "A cached image was evicted while being served; retry.",
                code="results_storage_unavailable",
            )
        return [b for b in blobs if b is not None]
