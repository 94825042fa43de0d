"""The batch parts for one process: Redis-backed when REDIS_URL is set (every replica works
every batch), else in memory with records on disk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.api.body import FORM_OVERHEAD
from gateway.batch.line import LineRunner
from gateway.batch.memory_backend import MemoryBatchRecords, MemoryLineQueue
from gateway.batch.redis_backend import RedisBatchRecords, RedisLineQueue
from gateway.batch.service import BatchService
from gateway.batch.store import BatchRecords, LineQueue
from gateway.batch.webhooks import WebhookSender
from gateway.batch.worker import BatchWorker
from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig
from gateway.fetch import UrlPolicy
from gateway.metrics import Metrics
from gateway.results.files import BatchBlobs
from gateway.service import EditService
from gateway.settings import Settings


@dataclass(slots=True)
class Batches:
    service: BatchService
    worker: BatchWorker
    closers: list[Any] = field(default_factory=list)  # objects with `aclose()`

    async def aclose(self) -> None:
        for part in reversed(self.closers):
            await part.aclose()


async def build_batches(
    settings: Settings,
    config: GatewayConfig,
    blobs: BatchBlobs,
    edits: EditService,
    catalog: ModelCatalog,
    metrics: Metrics,
    urls: Callable[[str], Callable[[str], str]],
) -> Batches:
    closers: list[Any] = []
    records: BatchRecords
    queue: LineQueue
    if settings.redis_url:
        from gateway.state.redis import connect

        client = connect(settings.redis_url, read_timeout_s=5.0, max_connections=16)
        closers.append(client)
        records = RedisBatchRecords(client, config.routing.redis_prefix)
        queue = RedisLineQueue(client, config.routing.redis_prefix)
    else:
        memory = MemoryBatchRecords(Path(settings.results_dir) / "batch" / "records")
        await memory.start()
        records, queue = memory, MemoryLineQueue()
    webhooks = None
    if settings.webhook_url and settings.webhook_secret:
        http = httpx.AsyncClient(follow_redirects=False)
        closers.append(http)
        webhooks = WebhookSender(
            settings.webhook_url,
            settings.webhook_secret,
            http,
            UrlPolicy(config.fetch),
            attempts=config.batch.webhook_attempts,
            timeout_s=config.batch.webhook_timeout_s,
        )
        closers.append(webhooks)
    # A line holds one request's body: an image as a data URI, and the fields around it.
    max_line = (config.limits.max_image_bytes * 4) // 3 + FORM_OVERHEAD
    worker = BatchWorker(
        records=records,
        queue=queue,
        blobs=blobs,
        runner=LineRunner(edits, config, catalog),
        config=config.batch,
        urls=urls,
        max_line=max_line,
        metrics=metrics,
        webhooks=webhooks,
    )
    return Batches(BatchService(records, blobs, config.batch, worker), worker, closers)
