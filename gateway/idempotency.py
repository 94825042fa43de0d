"""`Idempotency-Key`: a request sent again with the same key runs at most once.

The first request with a key claims it (one atomic store operation, shared across replicas)
and runs; its successful response is stored for `ttl_s` and replayed to every repeat. A
repeat that arrives while the first still runs waits for it. The same key with a different
request is a 409. A failed first request releases the key, so the client's retry runs
(the failure was not billed as a success). Keys are scoped to the client key that sent them,
so one team cannot read another's responses by guessing keys."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import IdempotencyConflict, IdempotencyInProgress, InvalidRequest
from gateway.state.base import StateStore

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


class Idempotency:
    def __init__(self, store: StateStore, ttl_s: float, lease_s: float, wait_s: float):
        self._store = store
        self._ttl_s = ttl_s
        self._lease_s = lease_s  # a claimant that died frees the key after this
        self._wait_s = wait_s

    @staticmethod
    def scoped(header: str, namespace: str) -> str:
        if not 1 <= len(header) <= MAX_KEY_CHARS or not header.isprintable():
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable characters.",
                param="Idempotency-Key",
            )
        return hashlib.sha256(f"{namespace}\0{header}".encode()).hexdigest()

    async def claim(self, key: str, print_: str) -> Stored | None:
        """None: this request runs (and must finish or release). Otherwise the stored answer."""
        deadline = time.monotonic() + self._wait_s
        delay = 0.05
        while True:
            claim = await self._store.idem_begin(key, print_, self._lease_s)
            if claim.state == "new":
                return None
            if claim.state == "done":
                stored = orjson.loads(claim.response)
                return Stored(stored["body"].encode(), stored["headers"])
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
