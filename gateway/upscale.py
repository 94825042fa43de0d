"""One upscale request from validated parameters to finished images: bound and prepare the
input, route `n` jobs, and finish each output to the exact size and format asked for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from adapters.base import ProviderBadResponse, ProviderResult, UpscaleJob
from gateway.config import GatewayConfig, InputConfig
from gateway.errors import GatewayError, PayloadTooLarge
from gateway.idempotency import Journal
from gateway.imaging import FinishedImage, OutputUnusable, SourceImage, finish, prepare_source
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
    cannot be stopped, and its memory is in use until it ends."""

    def __init__(self, concurrency: int):
        self._slots = asyncio.Semaphore(concurrency)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        await self._slots.acquire()
        try:
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        except BaseException:
            self._slots.release()
            raise
        work.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(work)


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

    async def prepare(self, data: bytes, prefs: Preferences) -> SourceImage:
        """Bound the input and make what each provider the request may use is sent."""
        limit = self._config.limits.max_image_bytes
        if len(data) > limit:
            raise PayloadTooLarge(f"The image is larger than {limit} bytes.", param="image")
        providers = self._config.providers
        rules = {
            name: (providers[name].input if name in providers else InputConfig()).rule()
            for name in self._router.admitted(prefs)
        }
        return await self._workers.run(prepare_source, data, self._config.limits, rules)

    async def run(
        self,
        source: SourceImage,
        params: UpscaleParams,
        prefs: Preferences,
        request_id: str,
        spend: Spend,
        journal: Journal | None = None,
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
