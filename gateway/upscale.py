"""One upscale request from validated parameters to finished images: bound and prepare the
input, route `n` jobs, and finish each output to the exact size and format asked for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from adapters.base import ProviderBadResponse, ProviderResult, UpscaleJob
from gateway.config import GatewayConfig
from gateway.errors import PayloadTooLarge
from gateway.idempotency import Journal
from gateway.imaging import FinishedImage, OutputUnusable, SourceImage, finish, prepare_source
from gateway.params import UpscaleParams, target_size
from gateway.routing.entries import Attempt
from gateway.routing.preferences import Preferences
from gateway.routing.router import Router, RoutingFailed, Served

R = TypeVar("R")


def _nth(job: UpscaleJob, index: int, journal: Journal | None) -> UpscaleJob:
    """Image `index` of the request: noted in the journal, and following the provider job
    an earlier claimant of the same request submitted for it, if any."""
    if journal is None:
        return job
    return replace(job, resume=journal.resume.get(index), on_submitted=journal.noter(index))


class ImageWorkers:
    """CPU-bound image work in threads, bounded so a burst cannot hold many decoded
    16-megapixel images in memory at once."""

    def __init__(self, concurrency: int):
        self._slots = asyncio.Semaphore(concurrency)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        async with self._slots:
            return await asyncio.to_thread(fn, *args)


@dataclass(slots=True)
class Upscaled:
    images: list[FinishedImage]
    providers: list[str]
    charges: list[tuple[str, float]]  # (provider, USD), hedge losers included
    attempts: list[Attempt]

    @property
    def cost_usd(self) -> float:
        return sum(price for _, price in self.charges)


class Upscaler:
    def __init__(self, config: GatewayConfig, router: Router, workers: ImageWorkers):
        self._config = config
        self._router = router
        self._workers = workers

    async def prepare(self, data: bytes) -> SourceImage:
        limit = self._config.limits.max_image_bytes
        if len(data) > limit:
            raise PayloadTooLarge(f"The image is larger than {limit} bytes.", param="image")
        return await self._workers.run(prepare_source, data, self._config.limits)

    async def run(
        self,
        source: SourceImage,
        params: UpscaleParams,
        prefs: Preferences,
        request_id: str,
        journal: Journal | None = None,
    ) -> Upscaled:
        target = target_size(params, source.width, source.height, self._config)
        plan = await self._router.plan(prefs, params.required_flags(), request_id)
        hedge = self._router.wants_hedge(prefs)
        job = UpscaleJob(
            png=source.png,
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

        served: list[Served[FinishedImage]] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._router.run(_nth(job, i, journal), plan, accept, hedge))
                    for i in range(params.n)
                ]
        except* RoutingFailed as failures:
            first = failures.exceptions[0]
            assert isinstance(first, RoutingFailed)
            raise first from None
        served = [t.result() for t in tasks]
        return Upscaled(
            images=[s.value for s in served],
            providers=[s.provider.name for s in served],
            charges=[c for s in served for c in s.charges],
            attempts=[a for s in served for a in s.attempts],
        )
