"""Operator routes (Bearer GATEWAY_ADMIN_KEY): see the shared provider records, drain a
provider (it gets no new traffic on any replica) and bring it back."""

from __future__ import annotations

import dataclasses
import hmac
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.context import Services, services
from gateway.errors import NotFound, Unauthorized


def _authorized(request: Request) -> Services:
    svc = services(request)
    if not svc.admin_key:
        raise NotFound("The admin API is disabled: set GATEWAY_ADMIN_KEY.", code="admin_disabled")
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), svc.admin_key.encode()):
        raise Unauthorized("A valid admin key is required.")
    return svc


async def list_providers(request: Request) -> Response:
    svc = _authorized(request)
    records = await svc.store.snapshot(svc.router.names, time.time(), svc.router.policy)
    now = time.time()
    body = {
        "object": "list",
        "data": [{**dataclasses.asdict(r), "circuit": r.circuit(now)} for r in records.values()],
    }
    return Response(orjson.dumps(body), media_type="application/json")


async def drain(request: Request) -> Response:
    svc = _authorized(request)
    name = request.path_params["name"]
    if name not in svc.router.names:
        raise NotFound(f"No provider '{name[:60]}'.", code="provider_not_found")
    drained = request.method == "PUT"
    await svc.store.set_drained(name, drained)
    return Response(
        orjson.dumps({"provider": name, "drained": drained}), media_type="application/json"
    )


routes = [
    Route("/admin/providers", list_providers, methods=["GET"]),
    Route("/admin/providers/{name}/drain", drain, methods=["PUT", "DELETE"]),
]
