"""Liveness and readiness."""

from __future__ import annotations

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.context import services


async def metrics(request: Request) -> Response:
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    svc = services(request)
    ready = any(p["enabled"] for p in svc.provider_status)
    store_ok = await svc.store.ping()
    degraded = not store_ok or bool(getattr(svc.store, "degraded", False))
    status = "unavailable" if not ready else "degraded" if degraded else "ready"
    body = {
        "status": status,
        "sandbox": svc.sandbox,
        "mode": "sandbox: emulated providers, nothing is billed" if svc.sandbox else "live",
        "providers": svc.provider_status,
        "state_store": {
            "kind": svc.store.kind,
            "ok": not degraded,
            # Routing goes on with this replica's own view while the shared store is away.
            "detail": getattr(svc.store, "last_error", "") if degraded else "",
        },
    }
    return Response(
        orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json"
    )


routes = [
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
