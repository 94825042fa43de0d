"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from gateway.api.context import AppServices, MetricsDep
from gateway.api.openapi import answers
from gateway.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.api_route(
    methods=["GET", "HEAD"],
    path="/metrics",
    summary="Prometheus metrics",
    response_model=None,
    responses=answers(None, media="text/plain"),
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.api_route(
    "/healthz",
    methods=["GET", "HEAD"],
    summary="Liveness: the process answers",
    response_model=None,
    responses=answers(Health),
)
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.api_route(
    methods=["GET", "HEAD"],
    path="/readyz",
    summary="Readiness: a provider is enabled, and the state store's health",
    response_model=None,
    responses={
        **answers(Readiness, description="Ready, or degraded (routing on local state)."),
        503: {"model": Readiness, "description": "No provider is enabled."},
    },
)
async def readyz(svc: AppServices) -> Response:
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
