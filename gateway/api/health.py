"""Liveness and readiness."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.context import services


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    svc = services(request)
    ready = any(p["enabled"] for p in svc.provider_status)
    body = {
        "status": "ready" if ready else "unavailable",
        "sandbox": svc.sandbox,
        "mode": "sandbox: emulated providers, nothing is billed" if svc.sandbox else "live",
        "providers": svc.provider_status,
        "state_store": {"kind": svc.state_store, "ok": True},
    }
    return Response(
        orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json"
    )


routes = [
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/readyz", readyz, methods=["GET"]),
]
