"""Operator routes (Bearer GATEWAY_ADMIN_KEY): the shared provider records, drain and
undrain a provider, set its price, reset its breaker, and the spend of every key. Every
change goes through the state store, so all replicas see it, and is logged."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.context import Services, services
from gateway.errors import InvalidRequest, NotFound, Unauthorized
from gateway.routing.candidates import priced

log = logging.getLogger("gateway.admin")


def admin_key_matches(svc: Services, authorization: str) -> bool:
    scheme, _, key = authorization.partition(" ")
    return (
        bool(svc.admin_key)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(key.strip().encode(), (svc.admin_key or "").encode())
    )


def authorized(request: Request) -> Services:
    svc = services(request)
    if not svc.admin_key:
        raise NotFound("The admin API is disabled: set GATEWAY_ADMIN_KEY.", code="admin_disabled")
    if not admin_key_matches(svc, request.headers.get("authorization", "")):
        raise Unauthorized("A valid admin key is required.")
    request.scope["state"]["key_id"] = "admin"
    return svc


async def provider_states(svc: Services) -> list[dict[str, Any]]:
    now = time.time()
    records = await svc.store.snapshot(svc.router.names, now, svc.router.policy)
    out = []
    for entry in svc.router.providers:
        record = records[entry.name]
        out.append(
            {
                **dataclasses.asdict(record),
                "circuit": record.circuit(now),
                "error_rate": round(record.error_rate, 4),
                "price_usd": priced(entry, record).price_usd,
                "config_price_usd": entry.price_usd,
            }
        )
    return out


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _provider(request: Request, svc: Services) -> str:
    name = str(request.path_params["name"])
    if name not in svc.router.names:
        raise NotFound(f"No provider '{name[:60]}'.", code="provider_not_found")
    return name


def _changed(request: Request, action: str, provider: str, **detail: Any) -> None:
    log.info(
        orjson.dumps(
            {
                "event": "admin",
                "request_id": request.scope["state"].get("request_id", ""),
                "action": action,
                "provider": provider,
                **detail,
            }
        ).decode()
    )


async def list_providers(request: Request) -> Response:
    svc = authorized(request)
    return _json({"object": "list", "data": await provider_states(svc)})


async def drain(request: Request) -> Response:
    svc = authorized(request)
    name = _provider(request, svc)
    drained = request.method == "PUT"
    await svc.store.set_drained(name, drained)
    svc.router.forget()
    _changed(request, "drain" if drained else "undrain", name)
    return _json({"provider": name, "drained": drained})


async def price(request: Request) -> Response:
    svc = authorized(request)
    name = _provider(request, svc)
    value: float | None = None
    if request.method == "PUT":
        try:
            raw = orjson.loads(await request.body())
            value = raw["price_usd"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise InvalidRequest(
                'Send JSON: {"price_usd": <USD per image>}.', param="price_usd"
            ) from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 100:
            raise InvalidRequest("'price_usd' must be a number from 0 to 100.", param="price_usd")
        value = float(value)
    await svc.store.set_price(name, value)
    svc.router.forget()
    _changed(request, "set_price" if value is not None else "reset_price", name, price_usd=value)
    return _json({"provider": name, "price_usd": value, "from_config": value is None})


async def reset(request: Request) -> Response:
    svc = authorized(request)
    name = _provider(request, svc)
    await svc.store.reset_breaker(name)
    svc.router.forget()
    _changed(request, "reset_breaker", name)
    return _json({"provider": name, "circuit": "closed"})


def days_param(request: Request, default: int = 7) -> int:
    raw = request.query_params.get("days", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= 400:
        raise InvalidRequest("'days' must be a whole number from 1 to 400.", param="days")
    return int(raw)


async def spend(request: Request) -> Response:
    svc = authorized(request)
    return _json(await svc.accounts.report(days_param(request)))


routes = [
    Route("/admin/providers", list_providers, methods=["GET"]),
    Route("/admin/providers/{name}/drain", drain, methods=["PUT", "DELETE"]),
    Route("/admin/providers/{name}/price", price, methods=["PUT", "DELETE"]),
    Route("/admin/providers/{name}/reset", reset, methods=["POST"]),
    Route("/admin/spend", spend, methods=["GET"]),
]
