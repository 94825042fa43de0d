"""`Idempotency-Key`: a request sent again with the same key runs at most once.

The first request with a key claims it (one atomic store operation, shared across replicas)
and runs; a reference to its result (the result files and the x-upscale headers, never the
images themselves) is stored for `ttl_s` and replayed to every repeat. A repeat that arrives
while the first still runs waits for it. The same key with a different request is a 409. A
failed first request releases the key, so the client's retry runs (the failure was not
billed as a success). Keys are scoped to the client key that sent them, so one team cannot
read another's responses by guessing keys.

The claimant renews a short lease while it runs and notes each provider job it submits in
the claim's journal. If its replica dies, the lease lapses within `lease_s`; the client's
retry, on any replica, takes the claim over and follows the jobs already submitted rather
than submitting (and paying for) them again. Each run owns the claim with a token of its
own: a claimant that was only slow learns at its next renewal that it lost the claim, then
submits nothing new (the owner follows its journaled jobs) and can neither overwrite the
stored result nor free the owner's claim. Each provider job is charged once in the ledger
(`Accounts`), whichever of the two followed it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.cache import CachedResult
from gateway.errors import IdempotencyConflict, IdempotencyInProgress, InvalidRequest
from gateway.state.base import BILLED_JOB_KEEP_S, ClaimStore, IdemClaim

log = logging.getLogger("gateway.idempotency")

HEADER = "idempotency-key"
MAX_KEY_CHARS = 255


@dataclass(frozen=True, slots=True)
class Stored:
    """What a replay answers with: the first run's result files and its headers."""

    result: CachedResult
    headers: dict[str, str]


def fingerprint(image: bytes | str, fields: Mapping[str, Any]) -> str:
    """The request's identity: the image and every field, in a canonical order."""
    digest = hashlib.sha256()
    digest.update(image.encode() if isinstance(image, str) else image)
    digest.update(canonical(fields))
    return digest.hexdigest()


_END = object()


def canonical(value: Any) -> bytes:
    """`value` as JSON with sorted keys, at any depth: orjson's own bytes where it can (it
    refuses more than 254 levels, and a body may nest a field deeper: bracket names in a
    form, an ignored JSON field), else the same bytes made without recursion. One encoding
    for both, so a request's fingerprint does not depend on which made it."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str)
    except orjson.JSONEncodeError:
        return _canonical_deep(value)


def _canonical_deep(value: Any) -> bytes:
    out = bytearray()
    # One frame per open container: its children still to write, and its closing bracket.
    # Memory grows with the depth, not with how many children a container has.
    stack: list[tuple[Iterator[Any], bytes]] = []
    first = True  # no comma before the first child of a container
    while True:
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError("Dict key must be str")  # as orjson refuses them
            # orjson's order: by code point (UTF-8 bytes sort alike).
            stack.append((iter(sorted(value.items())), b"}"))
            out += b"{"
            first = True
        elif isinstance(value, list | tuple):
            stack.append((iter(value), b"]"))
            out += b"["
            first = True
        else:  # a scalar; a value orjson cannot take at all still raises, as it did
            out += orjson.dumps(value, default=str)
            first = False
        while stack:
            children, close = stack[-1]
            child = next(children, _END)
            if child is _END:
                stack.pop()
                out += close
                first = False
                continue
            if not first:
                out += b","
            if close == b"}":
                key, child = child
                out += orjson.dumps(key) + b":"
            value = child
            break
        else:
            return bytes(out)


@dataclass(slots=True)
class Journal:
    """One run's claim on a key: the provider jobs of the request by image index, those an
    earlier claimant submitted (`resume`), and where this run notes its own; `lost` once
    another run (a retry that took the lapsed lease over) owns the claim."""

    key: str
    fingerprint: str
    store: ClaimStore
    owner: str = field(default_factory=lambda: secrets.token_hex(12))
    resume: dict[int, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)
    lost: bool = False
    noted: bool = False  # a provider job of this run is in the journal

    def owned(self) -> bool:
        return not self.lost

    def noter(self, index: int) -> Callable[[str, dict[str, str]], Awaitable[bool]]:
        async def note(provider: str, handle: dict[str, str]) -> bool:
            value = orjson.dumps({"provider": provider, "handle": handle}).decode()
            try:
                # One entry per provider job of the image (a hedge's beside its primary's):
                # a retry that takes the claim over follows each of them.
                noted = await self.store.idem_note(
                    self.key, self.fingerprint, f"{index}:{provider}", value, self.owner
                )
            except Exception:  # the job runs on; only a takeover would miss it
                log.warning("provider job not journaled for an idempotent request", exc_info=True)
                return False
            if not noted:
                self.lose()
            else:
                self.noted = True
            return noted

        return note

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            log.warning("an idempotent request's claim was taken over by a retry of it")


@dataclass(frozen=True, slots=True)
class Claimed:
    """`stored` when the request was served before; otherwise this request runs it."""

    stored: Stored | None
    journal: Journal | None = None


class Idempotency:
    def __init__(self, store: ClaimStore, ttl_s: float, lease_s: float, wait_s: float):
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
            journal = Journal(key, print_, self._store)
            claim = await self._store.idem_begin(key, print_, self._lease_s, journal.owner)
            if claim.state in ("new", "takeover"):
                journal.resume = _resumable(claim)
                journal.noted = bool(journal.resume)  # an earlier claimant's jobs are in it
                return Claimed(None, journal)
            if claim.state == "done":
                stored = orjson.loads(claim.response)
                return Claimed(Stored(CachedResult.loads(stored["result"]), stored["headers"]))
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
        self, journal: Journal, result: CachedResult, headers: Iterable[tuple[str, str]]
    ) -> bool:
        """Store the result for replays; False if another run owns the claim by now."""
        stored = orjson.dumps({"result": result.dumps(), "headers": dict(headers)}).decode()
        done = await self._store.idem_finish(
            journal.key, journal.fingerprint, stored, self._ttl_s, journal.owner
        )
        if not done:
            journal.lose()
        return done

    async def release(self, journal: Journal) -> None:
        await self._store.idem_release(journal.key, journal.fingerprint, journal.owner)

    async def hand_over(self, journal: Journal) -> None:
        """End this run's lease now, keeping the claim and its journal: the next attempt
        takes it over at once and follows the provider jobs noted in it (a result that was
        paid for but could not be stored is fetched again, not bought again). The claim
        stays as long as a replay would: a retry after a long store outage still follows."""
        with contextlib.suppress(Exception):  # unreachable: the lease lapses by itself
            await self._store.idem_renew(
                journal.key,
                journal.fingerprint,
                0.0,
                journal.owner,
                # Never past the ledger's memory of billed jobs: a follow after it would be
                # charged again.
                keep_s=min(self._ttl_s, BILLED_JOB_KEEP_S),
            )

    @contextlib.asynccontextmanager
    async def held(self, journal: Journal) -> AsyncIterator[None]:
        """Renew the claim's lease while the request runs; a renewal refused means another
        run took the claim over (this one was too slow to renew in time)."""

        async def renew() -> None:
            confirmed = time.monotonic()
            while not journal.lost:
                await asyncio.sleep(self._lease_s / 3)
                try:
                    kept = await self._store.idem_renew(
                        journal.key, journal.fingerprint, self._lease_s, journal.owner
                    )
                except Exception:
                    # The next renewal may get through; but after a whole lease without one,
                    # a retry that reaches the store may have taken the claim over.
                    if time.monotonic() - confirmed > self._lease_s:
                        journal.lose()
                    continue
                confirmed = time.monotonic()
                if not kept:
                    journal.lose()

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()


def _resumable(claim: IdemClaim) -> dict[int, list[tuple[str, dict[str, str]]]]:
    jobs: dict[int, list[tuple[str, dict[str, str]]]] = {}
    for name, value in claim.journal.items():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = orjson.loads(value)
            index = int(name.removeprefix("job:").split(":", 1)[0])
            jobs.setdefault(index, []).append((str(entry["provider"]), dict(entry["handle"])))
    return jobs
