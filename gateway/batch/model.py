"""A batch and a file as the gateway keeps them, and as OpenAI's API shows them."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# A batch in these states still has work; the others are final.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINT = "/v1/images/edits"
WINDOW = "24h"


def new_id(kind: str) -> str:
    """`kind_` and 24 hex digits: the creation time in milliseconds, then randomness. A list
    cursor whose object is gone (deleted between two pages) still says where it was."""
    return f"{kind}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


_STAMPED = re.compile(r"[-_]([0-9a-f]{12})[0-9a-f]{12}$")
CURSOR_PATTERN = r"^(batch_|file-(output-|errors-)?)[0-9a-f]{24}$"  # the ids new_id mints


def id_seconds(item_id: str) -> int | None:
    """When an id from `new_id` (or an output file named for its batch) was minted."""
    found = _STAMPED.search(item_id)
    return int(found.group(1), 16) // 1000 if found else None


@dataclass(slots=True)
class FileMeta:
    id: str
    account: str
    bytes: int
    filename: str
    purpose: str
    created_at: int
    expires_at: int | None = None

    def blob(self) -> str:
        return f"files/{self.id}"

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }

    def dumps(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def loads(cls, data: dict[str, Any]) -> FileMeta:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(slots=True)
class BatchState:
    id: str
    account: str
    input_file_id: str
    created_at: int
    expires_at: int
    base_url: str  # where the batch was created: its lines' result URLs are signed on it
    metadata: dict[str, str] | None = None
    status: str = "validating"
    total: int = 0
    completed: int = 0
    failed: int = 0
    spend_micro: int = 0  # what the providers billed for its lines, in micro-USD
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    # The status a finalization ends in: completed, or cancelled or expired when it was cut.
    outcome: str = "completed"

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def input_blob(self) -> str:
        return f"files/{self.input_file_id}"

    def line_blob(self, line: int) -> str:
        return f"lines/{self.id}/{line:08d}.jsonl"

    def index_blob(self) -> str:
        return f"lines/{self.id}/index"

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": WINDOW,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
            # Ours: what the providers billed for the batch's lines so far.
            "cost_usd": round(self.spend_micro / 1e6, 6),
        }

    def dumps(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def loads(cls, data: dict[str, Any]) -> BatchState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, slots=True)
class Entry:
    """One queued line: where it is in the input file. `id` is the queue's own handle."""

    id: str
    line: int
    offset: int
    length: int
