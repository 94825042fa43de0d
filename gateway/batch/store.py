"""What batches keep, as two small protocols: records (files, batches, each line's outcome and
the leases that bound how many lines run at once) and the queue of lines waiting to run.
Redis implements both for replicas that act as one (`redis_backend.py`); one process without
Redis keeps them in memory, with the records on disk so that a restart can tell which
batches it cut short (`memory_backend.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.batch.model import BatchState, Entry, FileMeta


class BatchRecords(Protocol):
    # Whether work survives a restart (a shared queue others go on with); a store that does
    # not fails the batches a restart cut short.
    durable: bool

    async def put_file(self, meta: FileMeta) -> None: ...
    async def get_file(self, file_id: str) -> FileMeta | None: ...
    async def list_files(self, account: str) -> list[FileMeta]: ...  # newest first
    async def delete_file(self, file_id: str) -> bool: ...

    async def create(self, state: BatchState) -> None: ...
    async def get(self, batch_id: str) -> BatchState | None: ...
    async def list(self, account: str) -> list[BatchState]: ...  # newest first
    async def active(self) -> list[str]: ...

    async def transition(
        self, batch_id: str, allowed: Sequence[str], status: str, **changes: Any
    ) -> BatchState | None:
        """Set `status` (and the given fields) if the batch is in one of `allowed` now; the
        new state, or None when another worker got there first."""
        ...

    async def mark_done(self, batch_id: str, line: int, ok: bool, spend_micro: int) -> bool:
        """Count a line's outcome once (a line run again after a reclaim is not counted
        twice); False when it was counted before."""
        ...

    async def outcomes(self, batch_id: str) -> dict[int, bool]:
        """The lines with an outcome: line -> whether it succeeded."""
        ...

    async def acquire(self, name: str, holder: str, limit: int, ttl_s: float) -> bool:
        """One of `limit` slots named `name`, held until released or `ttl_s` without renewal."""
        ...

    async def renew(self, name: str, holder: str, ttl_s: float) -> None: ...
    async def release(self, name: str, holder: str) -> None: ...
    async def holders(self, name: str) -> int: ...


class LineQueue(Protocol):
    async def enqueue(self, batch_id: str, entries: Sequence[Entry]) -> None: ...

    async def take(self, batch_id: str, consumer: str) -> Entry | None:
        """The next line nobody has taken."""
        ...

    async def reclaim(self, batch_id: str, consumer: str, idle_s: float) -> list[Entry]:
        """Lines taken by a worker that has not touched them for `idle_s` (it died)."""
        ...

    async def touch(self, batch_id: str, consumer: str, ids: Sequence[str]) -> None:
        """This worker still runs these lines: no one is to reclaim them."""
        ...

    async def ack(self, batch_id: str, entry_id: str) -> None: ...
    async def drop(self, batch_id: str) -> None: ...
