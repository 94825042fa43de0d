"""The batch worker every replica runs: it validates new batches, takes their lines from the
shared queue within the concurrency bounds (per replica, per batch and per key, the last two
as leases every replica counts), reclaims the lines of a worker that died, and finalizes a
batch once every line has an outcome (or it was cancelled, or its window passed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import orjson

from gateway.batch.jsonl import custom_id_of, scan
from gateway.batch.line import LineDeferred, LineRunner, output_line, request_id
from gateway.batch.model import BatchState, Entry, FileMeta
from gateway.batch.store import BatchRecords, LineQueue
from gateway.batch.webhooks import WebhookSender
from gateway.config import BatchConfig
from gateway.metrics import Metrics
from gateway.results.files import BatchBlobs, one

log = logging.getLogger("gateway.batch")

_ENDED = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
}


@dataclass(slots=True)
class _Running:
    batch_id: str
    account: str
    entry: Entry
    holder: str
    task: asyncio.Task[None] | None = None


def output_id(batch_id: str, kind: str) -> str:
    """The output (or error) file's id, the same on every replica: a finalization that
    starts over after its worker died writes the same file, not a second one."""
    return f"file-{kind}-{batch_id.removeprefix('batch_')}"


class BatchWorker:
    def __init__(
        self,
        *,
        records: BatchRecords,
        queue: LineQueue,
        blobs: BatchBlobs,
        runner: LineRunner,
        config: BatchConfig,
        urls: Callable[[str], Callable[[str], str]],  # base URL -> file id -> signed URL
        max_line: int,
        metrics: Metrics | None = None,
        webhooks: WebhookSender | None = None,
    ):
        self._records = records
        self._queue = queue
        self._blobs = blobs
        self._runner = runner
        self._config = config
        self._urls = urls
        self._max_line = max_line
        self._metrics = metrics
        self._webhooks = webhooks
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._running: dict[str, _Running] = {}
        self._leases: dict[str, str] = {}  # validation and finalization leases: name -> holder
        self._wake = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._running)

    def wake(self) -> None:
        self._wake.set()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.batch_lines_running.set(len(self._running))

    async def run_forever(self) -> None:
        beat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                try:
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis or the store away: the next tick tries again
                    log.warning("batch worker: %s: %s", type(exc).__name__, str(exc)[:200])
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._config.poll_s)
        finally:
            beat.cancel()
            tasks = [r.task for r in self._running.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(beat, *tasks, return_exceptions=True)

    async def tick(self) -> None:
        for batch_id in await self._records.active():
            try:
                await self._step(batch_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # One batch's trouble (its input deleted, a blob unreadable) must not stop
                # the batches after it, of every key, on every replica.
                log.warning("batch %s: %s: %s", batch_id, type(exc).__name__, str(exc)[:200])

    async def _step(self, batch_id: str) -> None:
        state = await self._records.get(batch_id)
        if state is None:
            return
        if state.status == "validating":
            await self._validate(state)
        elif state.status == "in_progress":
            await self._progress(state)
        elif state.status == "cancelling":
            if await self._records.holders(f"batch:{state.id}") == 0:
                await self._records.transition(
                    state.id,
                    ("cancelling",),
                    "finalizing",
                    finalizing_at=int(time.time()),
                    outcome="cancelled",
                )
                self.wake()
        elif state.status == "finalizing":
            await self._finalize(state)

    # -- validation ---------------------------------------------------------------------

    async def _lease(self, name: str, ttl_s: float) -> bool:
        holder = f"{self.name}:{name}"
        if await self._records.acquire(name, holder, 1, ttl_s):
            self._leases[name] = holder
            return True
        return False

    async def _unlease(self, name: str) -> None:
        holder = self._leases.pop(name, None)
        if holder is not None:
            await self._records.release(name, holder)

    async def _validate(self, state: BatchState) -> None:
        name = f"validate:{state.id}"
        if not await self._lease(name, self._config.reclaim_idle_s):
            return
        try:
            try:
                found = await scan(
                    self._blobs.stream(state.input_blob()), self._max_line, self._config.max_lines
                )
            except FileNotFoundError:
                if await self._records.get_file(state.input_file_id) is None:
                    await self._fail(state, "The input file was deleted before the batch ran.")
                else:  # kept where this replica cannot see it: another one may
                    log.warning(
                        "batch %s: its input file is not in this replica's store; replicas "
                        "running batches need one shared store (GATEWAY_RESULTS_URL)",
                        state.id,
                    )
                return
            if found.error_count:
                more = found.error_count - len(found.errors)
                if more > 0:
                    found.errors[-1]["message"] += f" ({more} more errors not listed)"
                await self._end_validation(state, found.errors)
                return
            entries = [Entry("", i, e.offset, e.length) for i, e in enumerate(found.entries)]
            index = orjson.dumps([[e.offset, e.length] for e in entries])
            await self._blobs.write(state.index_blob(), one(index))
            await self._queue.enqueue(state.id, entries)
            await self._records.transition(
                state.id,
                ("validating",),
                "in_progress",
                total=len(entries),
                in_progress_at=int(time.time()),
            )
            log.info("batch %s: %d lines queued", state.id, len(entries))
            self.wake()
        finally:
            await self._unlease(name)

    async def _fail(self, state: BatchState, message: str) -> None:
        error = {"code": "invalid_request", "line": None, "message": message, "param": None}
        await self._end_validation(state, [error])

    async def _end_validation(self, state: BatchState, errors: list[dict[str, object]]) -> None:
        ended = await self._records.transition(
            state.id, ("validating",), "failed", errors=errors, failed_at=int(time.time())
        )
        if ended is not None:
            self._ended(ended)

    # -- running lines ------------------------------------------------------------------

    async def _progress(self, state: BatchState) -> None:
        if time.time() >= state.expires_at:
            # As a cancel does: no line starts, and the batch is finalized only once the
            # lines running (on any replica) have their outcomes, so none paid is lost.
            if await self._records.holders(f"batch:{state.id}") > 0:
                return
            await self._records.transition(
                state.id,
                ("in_progress",),
                "finalizing",
                finalizing_at=int(time.time()),
                outcome="expired",
            )
            return
        free = self._config.concurrency - len(self._running)
        if free > 0:
            for entry in await self._queue.reclaim(
                state.id, self.name, self._config.reclaim_idle_s
            ):
                log.info("batch %s: line %d reclaimed", state.id, entry.line)
                if self._metrics is not None:
                    self._metrics.batch_lines_reclaimed.inc()
                await self._start(state, entry, reclaimed=True)
        while len(self._running) < self._config.concurrency:
            holder = f"{self.name}:{secrets.token_hex(6)}"
            if not await self._slots(state, holder):
                break
            entry = await self._queue.take(state.id, self.name)
            if entry is None:
                await self._free(state, holder)
                break
            await self._start(state, entry, holder=holder)
        if state.done >= state.total and not any(
            r.batch_id == state.id for r in self._running.values()
        ):
            moved = await self._records.transition(
                state.id, ("in_progress",), "finalizing", finalizing_at=int(time.time())
            )
            if moved is not None:
                await self._finalize(moved)

    async def _slots(self, state: BatchState, holder: str) -> bool:
        ttl = self._config.reclaim_idle_s
        if not await self._records.acquire(
            f"key:{state.account}", holder, self._config.per_key, ttl
        ):
            return False
        if not await self._records.acquire(
            f"batch:{state.id}", holder, self._config.per_batch, ttl
        ):
            await self._records.release(f"key:{state.account}", holder)
            return False
        return True

    async def _free(self, state: BatchState | _Running, holder: str) -> None:
        batch_id = state.id if isinstance(state, BatchState) else state.batch_id
        await self._records.release(f"batch:{batch_id}", holder)
        await self._records.release(f"key:{state.account}", holder)

    async def _start(
        self, state: BatchState, entry: Entry, *, holder: str | None = None, reclaimed: bool = False
    ) -> None:
        if holder is None:  # a reclaimed line runs past the bounds rather than wait idle again
            holder = f"{self.name}:{secrets.token_hex(6)}"
            await self._records.acquire(
                f"batch:{state.id}", holder, 1 << 30, self._config.reclaim_idle_s
            )
            await self._records.acquire(
                f"key:{state.account}", holder, 1 << 30, self._config.reclaim_idle_s
            )
        running = _Running(state.id, state.account, entry, holder)
        self._running[holder] = running
        self._gauge()
        running.task = asyncio.create_task(self._line(state, running))

    async def _line(self, state: BatchState, running: _Running) -> None:
        entry = running.entry
        try:
            url_for = self._urls(state.base_url)
            delay = 1.0
            while True:
                data = await self._blobs.read_range(state.input_blob(), entry.offset, entry.length)
                try:
                    result = await self._runner.run(state, entry.line, data, url_for)
                    break
                except LineDeferred as deferred:
                    current = await self._records.get(state.id)
                    if current is None or current.status != "in_progress":
                        return  # cancelled or expired meanwhile: the finalization says so
                    wait = max(deferred.after_s, delay) * random.uniform(0.8, 1.2)
                    log.info(
                        "batch %s line %d deferred %.1f s: %s",
                        state.id,
                        entry.line,
                        wait,
                        deferred.reason.message[:120],
                    )
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, 30.0)
            await self._blobs.write(state.line_blob(entry.line), one(result.output))
            counted = await self._records.mark_done(
                state.id, entry.line, result.ok, result.spend_micro
            )
            await self._queue.ack(state.id, entry.id)
            if counted and self._metrics is not None:
                self._metrics.batch_lines.labels("completed" if result.ok else "failed").inc()
                self._metrics.batch_spend_usd.inc(result.spend_micro / 1e6)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not answered: the line stays taken but untouched, and is reclaimed (by any
            # replica) once idle; its Idempotency-Key makes the rerun follow what was paid.
            log.warning(
                "batch %s line %d left for reclaim: %s: %s",
                state.id,
                entry.line,
                type(exc).__name__,
                str(exc)[:200],
            )
            return
        finally:
            if self._running.pop(running.holder, None) is not None:
                self._gauge()
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._free(running, running.holder))
            self.wake()

    async def _heartbeat(self) -> None:
        every = self._config.reclaim_idle_s / 3
        ttl = self._config.reclaim_idle_s
        while True:
            await asyncio.sleep(every)
            try:
                by_batch: dict[str, list[str]] = {}
                for r in list(self._running.values()):
                    await self._records.renew(f"batch:{r.batch_id}", r.holder, ttl)
                    await self._records.renew(f"key:{r.account}", r.holder, ttl)
                    by_batch.setdefault(r.batch_id, []).append(r.entry.id)
                for batch_id, ids in by_batch.items():
                    await self._queue.touch(batch_id, self.name, ids)
                for name, holder in list(self._leases.items()):
                    await self._records.renew(name, holder, ttl)
            except Exception as exc:
                log.warning("batch heartbeat: %s", type(exc).__name__)

    # -- finalization -------------------------------------------------------------------

    async def _finalize(self, state: BatchState) -> None:
        name = f"final:{state.id}"
        if not await self._lease(name, self._config.reclaim_idle_s):
            return
        try:
            outcomes = await self._records.outcomes(state.id)
            ending = state.outcome
            index: list[list[int]] = []
            if len(outcomes) < state.total:
                try:
                    raw = b"".join([c async for c in self._blobs.stream(state.index_blob())])
                    index = orjson.loads(raw)
                except FileNotFoundError:  # its input deleted: the lines not run go unnamed
                    index = [[0, 0]] * state.total
            now = int(time.time())
            changes: dict[str, object] = {f"{ending}_at": now}
            for kind, ok in (("output", True), ("errors", False)):
                lines = self._file_lines(state, outcomes, ok, index, ending)
                file_id = output_id(state.id, kind)
                size = await self._blobs.write(f"files/{file_id}", lines)
                if size == 0 and not ok:
                    await self._blobs.delete(f"files/{file_id}")
                    continue
                await self._records.put_file(
                    FileMeta(
                        file_id,
                        state.account,
                        size,
                        f"batch_{state.id}_{kind}.jsonl",
                        "batch_output",
                        now,
                    )
                )
                changes["output_file_id" if ok else "error_file_id"] = file_id
            ended = await self._records.transition(state.id, ("finalizing",), ending, **changes)
            if ended is None:
                return
            await self._queue.drop(state.id)
            await self._blobs.delete_prefix(f"lines/{state.id}")
            log.info(
                "batch %s %s: %d completed, %d failed of %d, $%.6f",
                state.id,
                ending,
                ended.completed,
                ended.failed,
                ended.total,
                ended.spend_micro / 1e6,
            )
            self._ended(ended)
        finally:
            await self._unlease(name)

    async def _file_lines(
        self,
        state: BatchState,
        outcomes: dict[int, bool],
        ok: bool,
        index: list[list[int]],
        ending: str,
    ) -> AsyncIterator[bytes]:
        for line in range(state.total):
            outcome = outcomes.get(line)
            if outcome is ok:
                async for chunk in self._blobs.stream(state.line_blob(line)):
                    yield chunk
                yield b"\n"
            elif outcome is None and not ok and index:
                offset, length = index[line]
                try:
                    data = await self._blobs.read_range(state.input_blob(), offset, length)
                except FileNotFoundError:
                    data = b"{}"
                code, message = _ENDED.get(ending, ("batch_incomplete", "Not run."))
                error = {"code": code, "message": message}
                yield output_line(request_id(state.id, line), custom_id_of(data), None, None, error)
                yield b"\n"

    def _ended(self, state: BatchState) -> None:
        if self._metrics is not None:
            self._metrics.batches.labels(state.status).inc()
        if self._webhooks is not None:
            self._webhooks.send(state.status, state.id)
