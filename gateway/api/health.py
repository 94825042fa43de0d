"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.admin import admin_key_matches
from gateway.api.context import AppServices, MetricsDep, RouterDep, services
from gateway.api.openapi import answers
from gateway.api.schemas import Health, Readiness
from gateway.errors import Unauthorized

router = APIRouter(tags=["health"])
# What /readyz shows without the admin key: whether each provider serves, not where it is.
_PUBLIC_PROVIDER_FIELDS = ("name", "adapter", "model", "credentials", "emulated", "enabled")


async def _scrape_authorized(request: Request) -> None:
    key = (services(request).metrics_key or "").strip()
    if not key:
        return  # development without a key: open (production refuses to start without one)
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    # compare_digest on bytes: a str with non-ASCII characters would raise, not mismatch.
    matches = scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), key.encode()
    )
    if not matches:
        raise Unauthorized(
            "A valid metrics key is required: send 'Authorization: Bearer <GATEWAY_METRICS_KEY>'.",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )


@router.api_route(
    methods=["GET", "HEAD"],
    path="/metrics",
    summary="Prometheus metrics",
    description="Needs `Authorization: Bearer <GATEWAY_METRICS_KEY>` when that is set "
    "(always in production); open in development without it.",
    response_model=None,
    responses=answers(None, 401, media="text/plain"),
    dependencies=[Depends(_scrape_authorized)],
)
async def metrics(metrics: MetricsDep, router: RouterDep) -> Response:
    # The breaker gauges show this worker's view of the shared store: read it now (cached for
    # about a second), so an idle worker does not answer with the state of its last request.
    await router.records()
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
    summary="Readiness: a provider is enabled, and the state and results stores' health",
    description="Each provider's `base_url` (and the reason it is off) only with the admin "
    "key (`Authorization: Bearer <GATEWAY_ADMIN_KEY>`); without it, names and states.",
    response_model=None,
    responses={
        **answers(
            Readiness, description="Ready, or degraded (local routing state; results store down)."
        ),
        503: {"model": Readiness, "description": "No provider is enabled."},
    },
)
async def readyz(svc: AppServices, request: Request) -> Response:
    # An emulated provider counts only in sandbox mode, which production never is: a
    # production replica without a real provider stays out of the load balancer.
    ready = any(p["enabled"] and (svc.sandbox or not p["emulated"]) for p in svc.provider_status)
    store_ok = await svc.store.ping()
    degraded = not store_ok or bool(getattr(svc.store, "degraded", False))
    results = svc.results
    # A store already known down answers at once (its own probe watches for its return);
    # otherwise a call of the last two seconds, or one bounded probe shared by every
    # /readyz meanwhile, says whether it still answers.
    results_ok = await results.health.check(results.ping)
    status = "unavailable" if not ready else "degraded" if degraded or not results_ok else "ready"
    body = {
        "status": status,
        "sandbox": svc.sandbox,
        "mode": "sandbox: emulated providers, nothing is billed" if svc.sandbox else "live",
        "providers": _providers(svc, request.headers.get("authorization", "")),
        "state_store": {
            "kind": svc.store.kind,
            "ok": not degraded,
            # Routing goes on with this replica's own view while the shared store is away.
            "detail": getattr(svc.store, "last_error", "") if degraded else "",
        },
        # Result URLs, cache hits and replays need it: while it is down those requests get
        # a retryable 503 results_storage_unavailable (b64_json runs on, uncached).
        "results_store": {
            "kind": results.kind,
            "ok": results_ok,
            # The store's error names its endpoint, bucket and object keys: the admin's only.
            "detail": results.health.last_error
            if not results_ok and admin_key_matches(svc, request.headers.get("authorization", ""))
            else "",
        },
    }
    return Response(
        orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json"
    )


def _providers(svc: AppServices, authorization: str) -> list[dict[str, Any]]:
    # Provider addresses can name inner hosts (a proxy, a private mirror): the admin's only.
    if admin_key_matches(svc, authorization):
        return svc.provider_status
    return [{k: p[k] for k in _PUBLIC_PROVIDER_FIELDS if k in p} for p in svc.provider_status]
