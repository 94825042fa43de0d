"""Batches in one process without Redis: records in memory, written through to a directory as
one JSON file each, and an in-process queue. The queue does not survive a restart; the
records do, so the next start fails the batches it cut short, with an error that says so,
instead of leaving them `in_progress` forever."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.batch.model import ACTIVE, BatchState, Entry, FileMeta

log = logging.getLogger("gateway.batch")
RESTARTED = {
    "code": "gateway_restarted",
    "message": "The gateway restarted while this batch ran; without Redis (REDIS_URL) batches "
    "do not survive a restart. Create it again: lines already answered are served from the "
    "idempotency store at no cost.",
    "param": None,
    "line": None,
}


class MemoryBatchRecords:
    durable = False

    def __init__(self, root: str | Path):
        self._root = Path(root)
        self._files: dict[str, FileMeta] = {}
        self._batches: dict[str, BatchState] = {}
        self._outcomes: dict[str, dict[int, bool]] = collections.defaultdict(dict)
        self._leases: dict[str, dict[str, float]] = collections.defaultdict(dict)

    async def start(self) -> None:
        """Load what an earlier run kept, and fail its unfinished batches."""
        loaded = await asyncio.to_thread(self._load)
        now = int(time.time())
        for state in loaded:
            if state.status in ACTIVE:
                state.status, state.failed_at = "failed", now
                state.errors = [dict(RESTARTED)]
                log.warning("batch %s: failed, cut short by a restart", state.id)
                await self._save_batch(state)
            self._batches[state.id] = state

    def _load(self) -> list[BatchState]:
        states: list[BatchState] = []
        for kind in ("files", "batches"):
            folder = self._root / kind
            if not folder.is_dir():
                continue
            for path in folder.glob("*.json"):
                try:
                    data = orjson.loads(path.read_bytes())
                except (OSError, orjson.JSONDecodeError):
                    log.warning("batch record %s unreadable: skipped", path)
                    continue
                if kind == "files":
                    meta = FileMeta.loads(data)
                    self._files[meta.id] = meta
                else:
                    states.append(BatchState.loads(data))
        return states

    async def _write(self, kind: str, name: str, data: dict[str, Any] | None) -> None:
        def write() -> None:
            folder = self._root / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.json"
            if data is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return
            temp = path.with_suffix(".part")
            temp.write_bytes(orjson.dumps(data))
            os.replace(temp, path)

        await asyncio.to_thread(write)

    async def _save_batch(self, state: BatchState) -> None:
        await self._write("batches", state.id, state.dumps())

    async def put_file(self, meta: FileMeta) -> None:
        self._files[meta.id] = meta
        await self._write("files", meta.id, meta.dumps())

    async def get_file(self, file_id: str) -> FileMeta | None:
        return self._files.get(file_id)

    async def list_files(self, account: str) -> list[FileMeta]:
        owned = [m for m in self._files.values() if m.account == account]
        return sorted(owned, key=lambda m: (m.created_at, m.id), reverse=True)

    async def delete_file(self, file_id: str) -> bool:
        if self._files.pop(file_id, None) is None:
            return False
        await self._write("files", file_id, None)
        return True

    async def create(self, state: BatchState) -> None:
        self._batches[state.id] = state
        await self._save_batch(state)

    async def get(self, batch_id: str) -> BatchState | None:
        state = self._batches.get(batch_id)
        return BatchState.loads(state.dumps()) if state else None  # a copy, as Redis gives

    async def list(self, account: str) -> list[BatchState]:
        owned = [
            BatchState.loads(b.dumps()) for b in self._batches.values() if b.account == account
        ]
        return sorted(owned, key=lambda b: (b.created_at, b.id), reverse=True)

    async def active(self) -> list[str]:
        return [b.id for b in self._batches.values() if b.status in ACTIVE]

    async def transition(
        self, batch_id: str, allowed: Sequence[str], status: str, **changes: Any
    ) -> BatchState | None:
        state = self._batches.get(batch_id)
        if state is None or state.status not in allowed:
            return None
        state.status = status
        for name, value in changes.items():
            setattr(state, name, value)
        await self._save_batch(state)
        return BatchState.loads(state.dumps())

    async def mark_done(self, batch_id: str, line: int, ok: bool, spend_micro: int) -> bool:
        state = self._batches.get(batch_id)
        outcomes = self._outcomes[batch_id]
        if state is None or line in outcomes:
            return False
        outcomes[line] = ok
        if ok:
            state.completed += 1
        else:
            state.failed += 1
        state.spend_micro += spend_micro
        return True

    async def outcomes(self, batch_id: str) -> dict[int, bool]:
        return dict(self._outcomes.get(batch_id, {}))

    def _live(self, name: str) -> dict[str, float]:
        held = self._leases[name]
        now = time.monotonic()
        for holder in [h for h, until in held.items() if until < now]:
            del held[holder]
        return held

    async def acquire(self, name: str, holder: str, limit: int, ttl_s: float) -> bool:
        held = self._live(name)
        if holder not in held and len(held) >= limit:
            return False
        held[holder] = time.monotonic() + ttl_s
        return True

    async def renew(self, name: str, holder: str, ttl_s: float) -> None:
        held = self._live(name)
        if holder in held:
            held[holder] = time.monotonic() + ttl_s

    async def release(self, name: str, holder: str) -> None:
        self._leases[name].pop(holder, None)

    async def holders(self, name: str) -> int:
        return len(self._live(name))


class MemoryLineQueue:
    """Lines waiting, per batch; what a worker took stays its own (one process: a worker
    that stops is the process stopping, and then the batch fails at the next start)."""

    def __init__(self) -> None:
        self._waiting: dict[str, collections.deque[Entry]] = collections.defaultdict(
            collections.deque
        )

    async def enqueue(self, batch_id: str, entries: Sequence[Entry]) -> None:
        self._waiting[batch_id].extend(entries)

    async def take(self, batch_id: str, consumer: str) -> Entry | None:
        waiting = self._waiting.get(batch_id)
        return waiting.popleft() if waiting else None

    async def reclaim(self, batch_id: str, consumer: str, idle_s: float) -> list[Entry]:
        return []

    async def touch(self, batch_id: str, consumer: str, ids: Sequence[str]) -> None:
        return None

    async def ack(self, batch_id: str, entry_id: str) -> None:
        return None

    async def drop(self, batch_id: str) -> None:
        self._waiting.pop(batch_id, None)
