"""The result cache, and coalescing of identical requests.

A result is named by a hash of the input's bytes and of every parameter that changes the
output (not `response_format`, `user` or routing preferences, which do not). The first
request for a name claims it in the state store (the same atomic claim as idempotency keys,
so one claim holds across replicas) and runs; identical requests that arrive meanwhile wait
for it: on this replica through an in-process future, on others by polling the claim. Its
images are kept in the cache's own file store (a size cap, least recently used first) and
the claim then names them, for `ttl_s`. A hit costs nothing.

The images live on each replica's disk: a hit whose files are on another replica's disk (no
shared results directory) runs again rather than fail."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import orjson

from gateway.config import OutputConfig
from gateway.errors import GatewayError, ResultsUnavailable
from gateway.imaging import FinishedImage
from gateway.params import UpscaleParams
from gateway.results import FileResultStore
from gateway.state.base import StateStore

log = logging.getLogger("gateway.cache")


def cache_key(image: bytes, params: UpscaleParams, output: OutputConfig) -> str:
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
    digest.update(orjson.dumps(shaping, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResult:
    files: tuple[str, ...]
    output_format: str
    size: str
    providers: tuple[str, ...]

    def dumps(self) -> str:
        return orjson.dumps(
            {
                "files": self.files,
                "output_format": self.output_format,
                "size": self.size,
                "providers": self.providers,
            }
        ).decode()

    @classmethod
    def of(
        cls, files: Sequence[str], images: Sequence[FinishedImage], providers: Sequence[str]
    ) -> CachedResult:
        first = images[0]
        size = f"{first.width}x{first.height}"
        return cls(tuple(files), first.output_format, size, tuple(providers))

    @classmethod
    def loads(cls, text: str) -> CachedResult:
        raw = orjson.loads(text)
        return cls(tuple(raw["files"]), raw["output_format"], raw["size"], tuple(raw["providers"]))


class _LeaderGone(Exception):
    """The request that held the claim ended without a result for a reason of its own."""


@dataclass(slots=True)
class Slot:
    """`entry` is set when the result exists (`kind` "hit" or "coalesced"); otherwise this
    request leads (`kind` "miss") and must `fill` it, or its failure frees the name."""

    kind: str
    entry: CachedResult | None
    key: str
    filled: CachedResult | None = None


class ResultCache:
    def __init__(
        self,
        store: StateStore,
        files: FileResultStore,
        ttl_s: float,
        lease_s: float,
        wait_s: float,
    ):
        self._store = store
        self.files = files
        self._ttl_s = ttl_s
        self._lease_s = lease_s  # a leader that died frees the name after this
        self._wait_s = wait_s
        self._local: dict[str, asyncio.Future[CachedResult]] = {}

    @staticmethod
    def _claim_key(key: str) -> str:
        return f"cache:{key}"

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[Slot]:
        slot = await self._find(key)
        if slot.kind != "miss":  # a result to serve, or a run that leads nobody
            yield slot
            return
        future: asyncio.Future[CachedResult] = asyncio.get_running_loop().create_future()
        self._local[key] = future
        try:
            yield slot
            if slot.filled is None:
                raise _LeaderGone("the leading request returned without a result")
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, GatewayError) else _LeaderGone())
            future.exception()  # retrieved: no "never retrieved" warning without followers
            self._local.pop(key, None)
            await asyncio.shield(self._store.idem_release(self._claim_key(key), key))
            raise
        future.set_result(slot.filled)
        self._local.pop(key, None)

    async def _find(self, key: str) -> Slot:
        deadline = time.monotonic() + self._wait_s
        delay = 0.02
        while True:
            local = self._local.get(key)
            if local is not None:
                try:
                    return Slot("coalesced", await asyncio.shield(local), key)
                except _LeaderGone:
                    continue  # its own failure: lead, or follow the next leader
            claim = await self._store.idem_begin(
                self._claim_key(key), key, self._lease_s, time.time()
            )
            if claim.state in ("new", "takeover"):  # a leader that died leaves it to us
                return Slot("miss", None, key)
            if claim.state == "done":
                entry = CachedResult.loads(claim.response)
                if await self._present(entry):
                    return Slot("hit", entry, key)
                # Evicted, or on another replica's disk: run again, without the name.
                return Slot("bypass", None, key)
            if time.monotonic() + delay > deadline:
                return Slot("bypass", None, key)  # the leader elsewhere is too slow to wait on
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _present(self, entry: CachedResult) -> bool:
        for file_id in entry.files:
            if self.files.path(file_id) is None:
                return False
        for file_id in entry.files:  # a hit keeps them: least recently used go first
            await self.files.keep(file_id, self._ttl_s)
        return True

    async def fill(
        self, slot: Slot, images: Sequence[FinishedImage], providers: Sequence[str]
    ) -> CachedResult:
        """Store the leader's images under the slot's name; a bypass stores them unnamed."""
        files = [await self.files.put(i.data, i.output_format) for i in images]
        entry = CachedResult.of(files, images, providers)
        if slot.kind == "miss":
            await self._store.idem_finish(
                self._claim_key(slot.key), slot.key, entry.dumps(), self._ttl_s
            )
            slot.filled = entry
        return entry

    async def read(self, entry: CachedResult) -> list[bytes]:
        paths = [self.files.path(f) for f in entry.files]
        if any(p is None for p in paths):
            raise ResultsUnavailable(
                "A cached image was evicted while being served; retry.",
                code="results_storage_unavailable",
            )
        return await asyncio.to_thread(lambda: [p.read_bytes() for p in paths if p])
