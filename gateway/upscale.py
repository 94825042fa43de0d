"""One upscale request from validated parameters to finished images: bound and prepare the
input, route `n` jobs, and finish each output to the exact size and format asked for."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from adapters.base import ProviderBadResponse, ProviderResult, UpscaleJob
from gateway.config import GatewayConfig, InputConfig
from gateway.errors import GatewayError, PayloadTooLarge
from gateway.idempotency import Journal
from gateway.imaging import (
    FinishedImage,
    OutputUnusable,
    SourceImage,
    check_bounds,
    finish,
    prepare_source,
    read_header,
)
from gateway.params import UpscaleParams, target_size
from gateway.routing.entries import Attempt
from gateway.routing.preferences import Preferences
from gateway.routing.router import Router, RoutingFailed, Served
from gateway.routing.spend import ABANDONED, SERVED, Spend

R = TypeVar("R")


def _nth(job: UpscaleJob, index: int, journal: Journal | None) -> UpscaleJob:
    """Image `index` of the request: noted in the journal, and following the provider job
    an earlier claimant of the same request submitted for it, if any."""
    if journal is None:
        return job
    return replace(
        job,
        resume=tuple(journal.resume.get(index, ())),
        on_submitted=journal.noter(index),
        may_submit=journal.owned,
    )


class ImageWorkers:
    """CPU-bound image work in threads, bounded so a burst cannot hold many decoded
    16-megapixel images in memory at once. A slot is held until its thread has finished,
    also when the awaiting request is cancelled (a hedge's loser, a client gone): the thread
    cannot be stopped, and its memory is in use until it ends.

    Fair across accounts: each account's jobs wait in a queue of its own, and a freed slot
    goes to the waiting account served least recently. One key's burst of huge images then
    delays another key's job by the time until a slot frees, not by the whole burst. Every
    slot is used while any job waits (no per-account cap), so a key alone gets them all."""

    def __init__(self, concurrency: int):
        self._free = concurrency
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._served: dict[str, int] = {}  # when each account last got a slot (a tick)
        self._running: dict[str, int] = {}  # slots each account holds
        self._tick = 0

    async def run(self, fn: Callable[..., R], *args: Any, account: str = "") -> R:
        await self._acquire(account)
        try:
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        except BaseException:
            self._release(account)
            raise
        work.add_done_callback(lambda _: self._release(account))
        return await asyncio.shield(work)

    def _grant(self, account: str) -> None:
        self._tick += 1
        self._served[account] = self._tick
        self._running[account] = self._running.get(account, 0) + 1

    async def _acquire(self, account: str) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._grant(account)
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(account, deque()).append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release(account)  # granted as it was cancelled: pass the slot on
            else:
                self._forget(account, turn)
            raise

    def _forget(self, account: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(account)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._waiting[account]
        self._prune(account)

    def _release(self, account: str) -> None:
        self._running[account] -= 1
        self._prune(account)
        while self._waiting:
            # The waiting account served least recently; one never served (or idle since
            # its last job ended) first, then in the order they began to wait.
            nxt = min(self._waiting, key=lambda a: self._served.get(a, 0))
            queue = self._waiting[nxt]
            turn = queue.popleft()
            if not queue:
                del self._waiting[nxt]
            if turn.done():  # its awaiter was cancelled while it waited
                continue
            self._grant(nxt)
            turn.set_result(None)
            return
        self._free += 1

    def _prune(self, account: str) -> None:
        """An account with nothing running or waiting is forgotten: state stays bounded by
        the accounts in flight, and it comes back as one never served."""
        if not self._running.get(account) and account not in self._waiting:
            self._running.pop(account, None)
            self._served.pop(account, None)


@dataclass(slots=True)
class Upscaled:
    images: list[FinishedImage]
    providers: list[str]
    attempts: list[Attempt]
    spend: Spend  # every job billed so far (follow-ups of abandoned jobs may add more)

    @property
    def cost_usd(self) -> float:
        return self.spend.usd


class UpscaleFailed(Exception):
    """An image could not be served: the error to answer with, the attempts made, and what
    the request's jobs were billed all the same."""

    def __init__(self, error: GatewayError, attempts: list[Attempt], spend: Spend):
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.spend = spend


class Upscaler:
    def __init__(self, config: GatewayConfig, router: Router, workers: ImageWorkers):
        self._config = config
        self._router = router
        self._workers = workers

    async def prepare(
        self,
        data: bytes,
        prefs: Preferences,
        params: UpscaleParams | None = None,
        *,
        account: str = "",
    ) -> SourceImage:
        """Bound the input and make what each provider the request may use is sent. With
        `params`, an input or an output over the limits is refused from the header first,
        before an image worker decodes a pixel (or the request waits for one)."""
        limits = self._config.limits
        limit = limits.max_image_bytes
        if len(data) > limit:
            raise PayloadTooLarge(f"The image is larger than {limit} bytes.", param="image")
        if params is not None:
            # Header-only (milliseconds, no pixels held), so in a plain thread, not a worker.
            header = await asyncio.to_thread(read_header, data)
            if header is not None:  # else prepare_source answers as it always has
                check_bounds(header.width, header.height, limits)  # its first refusal, too
                target_size(params, *header.upright, self._config)
        providers = self._config.providers
        rules = {
            name: (providers[name].input if name in providers else InputConfig()).rule()
            for name in self._router.admitted(prefs)
        }
        return await self._workers.run(prepare_source, data, limits, rules, account=account)

    async def run(
        self,
        source: SourceImage,
        params: UpscaleParams,
        prefs: Preferences,
        request_id: str,
        spend: Spend,
        journal: Journal | None = None,
        *,
        account: str = "",
    ) -> Upscaled:
        """Route the request's `n` images; raises UpscaleFailed when one fails (its
        siblings are cancelled, and what they were billed stays in `spend`)."""
        target = target_size(params, source.width, source.height, self._config)
        prepared = source.prepared
        plan = await self._router.plan(prefs, params.required_flags(), request_id, prepared.unfit)
        hedge = self._router.wants_hedge(prefs)
        lead = prepared.inputs[plan[0].entry.name]
        job = UpscaleJob(
            image=lead.data,
            mime=lead.mime,
            inputs={name: (e.data, e.mime) for name, e in prepared.inputs.items()},
            width=source.width,
            height=source.height,
            deadline=time.monotonic() + self._config.limits.request_timeout_s,
            request_id=request_id,
            options=params.provider_options(),
            priority=params.priority,
        )

        async def accept(provider: str, result: ProviderResult) -> FinishedImage:
            try:
                return await self._workers.run(
                    finish,
                    result.image,
                    target,
                    params.output_format,
                    params.output_compression,
                    source.alpha,
                    self._config.output,
                    account=account,
                )
            except OutputUnusable as exc:
                raise ProviderBadResponse(provider, str(exc)) from exc

        tasks = [
            asyncio.ensure_future(
                self._router.run(_nth(job, i, journal), plan, accept, hedge, spend)
            )
            for i in range(params.n)
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # failed, or this request was cancelled: the siblings stop too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        failed = [t for t in tasks if t.cancelled() or t.exception() is not None]
        if failed:
            for charge in spend.charges:  # images made for a request that fails are waste
                if charge.attempt.fate == SERVED:
                    charge.attempt.fate = ABANDONED
            attempts = [a for t in tasks if _done(t) for a in t.result().attempts]
            first = next((t for t in failed if not t.cancelled()), failed[0])
            error: BaseException = (
                asyncio.CancelledError() if first.cancelled() else first.exception()  # type: ignore[assignment]
            )
            if isinstance(error, RoutingFailed):
                raise UpscaleFailed(error.error, [*attempts, *error.attempts], spend) from None
            raise error
        served: list[Served[FinishedImage]] = [t.result() for t in tasks]
        return Upscaled(
            images=[s.value for s in served],
            providers=[s.provider.name for s in served],
            attempts=[a for s in served for a in s.attempts],
            spend=spend,
        )


def _done(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
