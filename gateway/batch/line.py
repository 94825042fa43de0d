"""One batch line from its JSON to its output line, through the same EditService a live
request goes through (routing, budget, cache, idempotency), with the line's own id as its
Idempotency-Key: a line run again after its worker died follows the provider job already
submitted, and a line already answered is replayed at no cost."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from gateway.api.body import EditBody, json_image_ref
from gateway.batch.jsonl import OFF_LOOP
from gateway.batch.model import BatchState
from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig
from gateway.errors import (
    BodiesBusy,
    GatewayError,
    IdempotencyInProgress,
    NoProviderAvailable,
    RateLimited,
    ResultsUnavailable,
    StateUnavailable,
    envelope,
    internal_error,
)
from gateway.params import check_depth, parse_params
from gateway.routing.preferences import parse_preferences
from gateway.service import EditService, images_body, pin_model

log = logging.getLogger("gateway.batch")

# Refusals that pass: the key's rate or concurrency, a store or Redis outage, no provider
# healthy now. The line waits and runs again; the batch's window bounds the wait.
TRANSIENT = (
    RateLimited,
    IdempotencyInProgress,
    BodiesBusy,
    ResultsUnavailable,
    StateUnavailable,
    NoProviderAvailable,
)


class LineDeferred(Exception):
    """The line could not run now for a reason that passes; `after_s`: when to try again."""

    def __init__(self, reason: GatewayError, after_s: float):
        super().__init__(reason.message)
        self.reason = reason
        self.after_s = after_s


@dataclass(frozen=True, slots=True)
class LineResult:
    output: bytes  # the output line, without its newline
    ok: bool
    spend_micro: int


def request_id(batch_id: str, line: int) -> str:
    """The line's `batch_req_` id: the same every time the line runs."""
    digest = hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]
    return f"batch_req_{digest}"


def output_line(
    rid: str, custom_id: str, status: int | None, body: bytes | None, error: Any = None
) -> bytes:
    """OpenAI's output line; `body` is JSON already (megabytes of b64_json are not parsed
    again to be nested)."""
    head = orjson.dumps({"id": rid, "custom_id": custom_id})[:-1]
    if status is None:
        response = b"null"
    else:
        response = (
            b'{"status_code":'
            + str(status).encode()
            + b',"request_id":'
            + orjson.dumps(rid)
            + b',"body":'
            + (body or b"null")
            + b"}"
        )
    return head + b',"response":' + response + b',"error":' + orjson.dumps(error) + b"}"


def _micro(usd: str | float | None) -> int:
    try:
        return round(float(usd or 0) * 1_000_000)
    except ValueError:
        return 0


class LineRunner:
    def __init__(self, edits: EditService, config: GatewayConfig, catalog: ModelCatalog):
        self._edits = edits
        self._config = config
        self._catalog = catalog

    async def run(
        self, state: BatchState, line: int, data: bytes, url_for: Callable[[str], str]
    ) -> LineResult:
        rid = request_id(state.id, line)
        big = len(data) > OFF_LOOP
        parsed = await asyncio.to_thread(orjson.loads, data) if big else orjson.loads(data)
        custom_id = str(parsed.get("custom_id", ""))
        try:
            content, spend = await self._edit(state, line, dict(parsed["body"]), rid, url_for)
        except TRANSIENT as exc:
            after = exc.headers.get("retry-after", "")
            raise LineDeferred(exc, float(after) if after.isdigit() else 1.0) from None
        except GatewayError as exc:
            body = envelope(exc.message, exc.type, exc.param, exc.code)
            spend = _micro(exc.headers.get("x-upscale-cost-usd"))
            return LineResult(output_line(rid, custom_id, exc.status, body), False, spend)
        except Exception:
            # A defect, not the line's fault; answered as the live route would (a 500).
            log.exception("batch %s line %d failed", state.id, line)
            exc = internal_error()
            body = envelope(exc.message, exc.type, exc.param, exc.code)
            return LineResult(output_line(rid, custom_id, 500, body), False, 0)
        return LineResult(output_line(rid, custom_id, 200, content), True, spend)

    async def _edit(
        self,
        state: BatchState,
        line: int,
        fields: dict[str, Any],
        rid: str,
        url_for: Callable[[str], str],
    ) -> tuple[bytes, int]:
        check_depth(fields)
        body = EditBody(fields, image_ref=json_image_ref(fields))
        params = parse_params(body.fields, self._config, text=False)
        prefs = parse_preferences(body.fields.get("provider"), self._edits.providers, text=False)
        prefs = pin_model(self._catalog, params, prefs)
        # Batch work waits anyway: the cheapest healthy provider, never a hedge's second job,
        # at the provider's low queue priority.
        prefs = replace(prefs, sort="cheapest", hedge=False)
        params = replace(params, priority="low")
        edited = await self._edits.edit(
            body, params, prefs, state.account, rid, idempotency_key=f"batch:{state.id}:{line}"
        )
        # A replay is free to the caller, but its first run billed the batch.
        first = edited.headers.get("x-upscale-first-cost-usd")
        spend = _micro(first if first is not None else edited.cost_usd)
        return await images_body(edited, url_for), spend
