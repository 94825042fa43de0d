"""Pure ASGI middleware: a request id on every response (errors included) and one
structured access-log line per request."""

from __future__ import annotations

import logging
import secrets
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response, internal_error
from gateway.state.base import EventStore

log = logging.getLogger("gateway.access")
errors = logging.getLogger("gateway.errors")
UPSCALE_PATH = "/v1/images/edits"
_CACHE_EVENTS = {"hit": "cache_hits", "coalesced": "cache_coalesced", "miss": "cache_misses"}


async def _count(store: EventStore, status: int, cache: str) -> None:
    """The last hour's shared figures (the status page): one upscale request's events."""
    events = {"requests": 1}
    if status >= 500:
        events["errors"] = 1
    elif status == 429:
        events["limited"] = 1
    if cache in _CACHE_EVENTS:
        events[_CACHE_EVENTS[cache]] = 1
    try:
        await store.count_events(time.time(), events)
    except Exception:  # figures for a page: never worth failing the request's log over
        log.debug("events not counted", exc_info=True)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"req_{secrets.token_hex(12)}"
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500
        upscale: dict[str, str] = {}
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                for name, value in headers:
                    if name.startswith(b"x-upscale-"):
                        upscale[name[10:].decode()] = value.decode("latin-1")
                message["headers"] = headers
            await send(message)

        try:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Answered here rather than by Starlette's outermost error middleware, so a
                # 500 carries its request id too (and the log line says which request).
                if started_response:
                    raise
                errors.exception(
                    "unhandled error on %s %s (%s)", scope["method"], scope["path"], rid
                )
                await error_response(internal_error())(scope, receive, send_with_id)
        finally:
            ms = round((time.perf_counter() - started) * 1000, 1)
            # Never the key, a token or image bytes: the key's id and the routing outcome.
            line = {
                "event": "request",
                "request_id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "key_id": scope["state"].get("key_id"),
                "provider": upscale.get("provider", ""),
                "attempts": upscale.get("attempts", ""),
                "cost_usd": float(upscale.get("cost-usd") or 0),
                "cache": upscale.get("cache", ""),
                "ms": ms,
            }
            log.info(orjson.dumps(line).decode())
            services = getattr(getattr(scope.get("app"), "state", None), "services", None)
            if services is not None:
                services.metrics.requests.labels(str(status)).inc()
                if scope["path"] == UPSCALE_PATH:
                    await _count(services.store, status, upscale.get("cache", ""))
