"""Pure ASGI middleware: a request id on every response (errors included) and one
structured access-log line per request."""

from __future__ import annotations

import logging
import secrets
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway.access")


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
        provider = ""

        async def send_with_id(message: Message) -> None:
            nonlocal status, provider
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                for name, value in headers:
                    if name == b"x-upscale-provider":
                        provider = value.decode()
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            services = getattr(getattr(scope.get("app"), "state", None), "services", None)
            if services is not None:
                services.metrics.requests.labels(str(status)).inc()
            log.info(
                orjson.dumps(
                    {
                        "event": "request",
                        "request_id": rid,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "key_id": scope["state"].get("key_id"),
                        "provider": provider,
                        "ms": round((time.perf_counter() - started) * 1000, 1),
                    }
                ).decode()
            )
