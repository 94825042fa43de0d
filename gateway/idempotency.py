"""`Idempotency-Key`: a request sent again with the same key runs at most once.

The first request with a key claims it (one atomic store operation, shared across replicas)
and runs; its successful response is stored for `ttl_s` and replayed to every repeat. A
repeat that arrives while the first still runs waits for it. The same key with a different
request is a 409. A failed first request releases the key, so the client's retry runs
(the failure was not billed as a success). Keys are scoped to the client key that sent them,
so one team cannot read another's responses by guessing keys.

The claimant renews a short lease while it runs and notes each provider job it submits in
the claim's journal. If its replica dies, the lease lapses within `lease_s`; the client's
retry, on any replica, takes the claim over and follows the jobs already submitted rather
than submitting (and paying for) them again."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import IdempotencyConflict, IdempotencyInProgress, InvalidRequest
from gateway.state.base import IdemClaim, StateStore

log = logging.getLogger("gateway.idempotency")

HEADER = "idempotency-key"
MAX_KEY_CHARS = 255


@dataclass(frozen=True, slots=True)
class Stored:
    body: bytes
    headers: dict[str, str]


def fingerprint(image: bytes | str, fields: Mapping[str, Any]) -> str:
    """The request's identity: the image and every field, in a canonical order."""
    digest = hashlib.sha256()
    digest.update(image.encode() if isinstance(image, str) else image)
    digest.update(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS, default=str))
    return digest.hexdigest()


@dataclass(slots=True)
class Journal:
    """The provider jobs of one claimed request, by image index: those an earlier claimant
    submitted (`resume`), and where this run notes its own."""

    key: str
    fingerprint: str
    store: StateStore
    resume: dict[int, tuple[str, dict[str, str]]] = field(default_factory=dict)

    def noter(self, index: int) -> Callable[[str, dict[str, str]], Awaitable[None]]:
        async def note(provider: str, handle: dict[str, str]) -> None:
            value = orjson.dumps({"provider": provider, "handle": handle}).decode()
            try:
                await self.store.idem_note(self.key, self.fingerprint, str(index), value)
            except Exception:  # the job runs on; only a takeover would miss it
                log.warning("provider job not journaled for an idempotent request", exc_info=True)

        return note


@dataclass(frozen=True, slots=True)
class Claimed:
    """`stored` when the request was served before; otherwise this request runs it."""

    stored: Stored | None
    journal: Journal | None = None


class Idempotency:
    def __init__(self, store: StateStore, ttl_s: float, lease_s: float, wait_s: float):
        self._store = store
        self._ttl_s = ttl_s
        self._lease_s = lease_s  # a claimant that stops renewing frees the key after this
        self._wait_s = wait_s

    @staticmethod
    def scoped(header: str, namespace: str) -> str:
        if not 1 <= len(header) <= MAX_KEY_CHARS or not header.isprintable():
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable characters.",
                param="Idempotency-Key",
            )
        return hashlib.sha256(f"{namespace}\0{header}".encode()).hexdigest()

    async def claim(self, key: str, print_: str) -> Claimed:
        """The stored answer, or the journal of a request this one now runs (and must
        finish or release, inside `held`)."""
        deadline = time.monotonic() + self._wait_s
        delay = 0.05
        while True:
            claim = await self._store.idem_begin(key, print_, self._lease_s, time.time())
            if claim.state in ("new", "takeover"):
                return Claimed(None, Journal(key, print_, self._store, _resumable(claim)))
            if claim.state == "done":
                stored = orjson.loads(claim.response)
                return Claimed(Stored(stored["body"].encode(), stored["headers"]))
            if claim.state == "conflict":
                raise IdempotencyConflict(
                    "This Idempotency-Key was already used with a different request; "
                    "use a new key for a new request.",
                    param="Idempotency-Key",
                )
            if time.monotonic() + delay > deadline:
                raise IdempotencyInProgress(
                    "A request with this Idempotency-Key is still running; retry later.",
                    param="Idempotency-Key",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def finish(
        self, key: str, print_: str, body: bytes, headers: Iterable[tuple[str, str]]
    ) -> None:
        stored = orjson.dumps({"body": body.decode(), "headers": dict(headers)}).decode()
        await self._store.idem_finish(key, print_, stored, self._ttl_s)

    async def release(self, key: str, print_: str) -> None:
        await self._store.idem_release(key, print_)

    @contextlib.asynccontextmanager
    async def held(self, key: str, print_: str) -> AsyncIterator[None]:
        """Renew the claim's lease while the request runs."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self._lease_s / 3)
                with contextlib.suppress(Exception):  # the next renewal may get through
                    await self._store.idem_renew(key, print_, self._lease_s, time.time())

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()


def _resumable(claim: IdemClaim) -> dict[int, tuple[str, dict[str, str]]]:
    jobs: dict[int, tuple[str, dict[str, str]]] = {}
    for name, value in claim.journal.items():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = orjson.loads(value)
            jobs[int(name.removeprefix("job:"))] = (str(entry["provider"]), dict(entry["handle"]))
    return jobs
