"""The Files and Batches operations, between the routes and the records: who owns what, what
a batch may be created with, and OpenAI's list pages. No HTTP here."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gateway.batch.model import (
    ENDPOINT,
    FINAL,
    WINDOW,
    BatchState,
    FileMeta,
    id_seconds,
    new_id,
)
from gateway.batch.store import BatchRecords
from gateway.batch.worker import BatchWorker
from gateway.config import BatchConfig
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.results.files import BatchBlobs

PURPOSES = ("batch",)
MAX_METADATA = 16


class BatchConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "batch_not_cancellable"


def page(
    items: Sequence[dict[str, Any]], after: str | None, limit: int, descending: bool = True
) -> dict[str, Any]:
    """OpenAI's cursor page: the `limit` items after the one with id `after`, in the order
    of (created_at, id) the records list them in. A cursor whose item is gone (deleted
    between two pages) still places the page by the time in its id."""
    start = 0
    if after:
        ids = [i["id"] for i in items]
        if after in ids:
            start = ids.index(after) + 1
        else:
            seconds = id_seconds(after)
            if seconds is None:
                raise InvalidRequest(
                    f"'{after[:80]}' is not a list cursor: pass the last id of a page.",
                    param="after",
                )
            mark = (seconds, after)
            start = next(
                (
                    n
                    for n, item in enumerate(items)
                    if ((item["created_at"], item["id"]) < mark) == descending
                ),
                len(items),
            )
    chunk = list(items[start : start + limit])
    return {
        "object": "list",
        "data": chunk,
        "first_id": chunk[0]["id"] if chunk else None,
        "last_id": chunk[-1]["id"] if chunk else None,
        "has_more": start + limit < len(items),
    }


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        raise InvalidRequest(
            f"'metadata' must be an object of at most {MAX_METADATA} string pairs.",
            param="metadata",
        )
    for key, item in value.items():
        if not (isinstance(item, str) and len(key) <= 64 and len(item) <= 512):
            raise InvalidRequest(
                "'metadata' keys are at most 64 characters, its values strings of at most 512.",
                param="metadata",
            )
    return dict(value)


class BatchService:
    def __init__(
        self,
        records: BatchRecords,
        blobs: BatchBlobs,
        config: BatchConfig,
        worker: BatchWorker | None = None,
    ):
        self.records = records
        self.blobs = blobs
        self.config = config
        self.worker = worker

    # -- files ----------------------------------------------------------------------

    async def upload(
        self, account: str, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> FileMeta:
        file_id = f"file-{new_id('u').removeprefix('u_')}"
        meta = FileMeta(file_id, account, 0, filename[:255] or "upload.jsonl", purpose, 0)
        meta.bytes = await self.blobs.write(meta.blob(), chunks)
        meta.created_at = int(time.time())
        await self.records.put_file(meta)
        return meta

    async def file(self, account: str, file_id: str) -> FileMeta:
        meta = await self.records.get_file(file_id) if file_id.startswith("file-") else None
        if meta is None or meta.account != account:  # another key's file does not exist
            raise NotFound(
                f"No such file: '{file_id[:80]}'.", param="file_id", code="file_not_found"
            )
        return meta

    async def files(
        self, account: str, purpose: str | None, after: str | None, limit: int, order: str
    ) -> dict[str, Any]:
        metas = await self.records.list_files(account)
        items = [m.public() for m in metas if purpose is None or m.purpose == purpose]
        if order == "asc":
            items.reverse()
        return page(items, after, limit, descending=order != "asc")

    async def delete_file(self, account: str, file_id: str) -> dict[str, Any]:
        meta = await self.file(account, file_id)
        await self.records.delete_file(meta.id)
        await self.blobs.delete(meta.blob())
        return {"id": meta.id, "object": "file", "deleted": True}

    async def content(self, account: str, file_id: str) -> tuple[FileMeta, AsyncIterator[bytes]]:
        meta = await self.file(account, file_id)
        return meta, self.blobs.stream(meta.blob())

    # -- batches --------------------------------------------------------------------

    async def create(self, account: str, body: Any, base_url: str) -> BatchState:
        if not isinstance(body, dict):
            raise InvalidRequest("The body must be a JSON object.")
        unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidRequest(f"Unknown parameter: '{name[:60]}'.", param=name[:60])
        if body.get("endpoint") != ENDPOINT:
            raise InvalidRequest(
                f"'endpoint' must be \"{ENDPOINT}\": the only endpoint this gateway batches.",
                param="endpoint",
            )
        if body.get("completion_window") != WINDOW:
            raise InvalidRequest(
                f"'completion_window' must be \"{WINDOW}\".", param="completion_window"
            )
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidRequest("'input_file_id' must be a file id.", param="input_file_id")
        meta = await self.file(account, file_id)
        if meta.purpose != "batch":
            raise InvalidRequest(
                f"The file '{file_id}' was uploaded for '{meta.purpose}', not 'batch'.",
                param="input_file_id",
            )
        now = int(time.time())
        state = BatchState(
            id=new_id("batch"),
            account=account,
            input_file_id=file_id,
            created_at=now,
            expires_at=now + self.config.window_s,
            base_url=base_url,
            metadata=_metadata(body.get("metadata")),
        )
        await self.records.create(state)
        if self.worker is not None:
            self.worker.wake()
        return state

    async def get(self, account: str, batch_id: str) -> BatchState:
        state = await self.records.get(batch_id) if batch_id.startswith("batch_") else None
        if state is None or state.account != account:
            raise NotFound(f"No such batch: '{batch_id[:80]}'.", param="batch_id")
        return state

    async def list(self, account: str, after: str | None, limit: int) -> dict[str, Any]:
        states = await self.records.list(account)
        return page([s.public() for s in states], after, limit)

    async def cancel(self, account: str, batch_id: str) -> BatchState:
        state = await self.get(account, batch_id)
        if state.status in ("cancelling", "cancelled"):
            return state
        moved = await self.records.transition(
            state.id,
            ("validating", "in_progress"),
            "cancelling",
            cancelling_at=int(time.time()),
        )
        if moved is None:
            current = await self.get(account, batch_id)
            if current.status in FINAL or current.status == "finalizing":
                raise BatchConflict(
                    f"The batch is {current.status}; only a validating or in-progress batch "
                    "can be cancelled.",
                    param="batch_id",
                )
            return current
        if self.worker is not None:
            self.worker.wake()
        return moved

    async def progress(self) -> dict[str, Any]:
        """For /status: the batches still running on the shared records, and their lines."""
        running: list[dict[str, Any]] = []
        for batch_id in await self.records.active():
            state = await self.records.get(batch_id)
            if state is not None:
                running.append(
                    {
                        "id": state.id,
                        "status": state.status,
                        "total": state.total,
                        "completed": state.completed,
                        "failed": state.failed,
                        "cost_usd": round(state.spend_micro / 1e6, 6),
                    }
                )
        return {
            "running": len(running),
            "lines_done": sum(b["completed"] + b["failed"] for b in running),
            "lines_total": sum(b["total"] for b in running),
            "spend_usd": round(sum(b["cost_usd"] for b in running), 6),
            "batches": running[:50],
            "lines_running_here": self.worker.running if self.worker else 0,
        }
