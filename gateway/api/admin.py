"""Operator routes (Bearer GATEWAY_ADMIN_KEY): the shared provider records, drain and
undrain a provider, set its price, reset its breaker, and the spend of every key. Every
change goes through the state store, so all replicas see it, and is logged."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.context import Services, services
from gateway.api.openapi import answers
from gateway.api.schemas import BreakerReset, Drained, PriceChange, Priced, ProviderStates, Spend
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


async def _authorized(request: Request) -> Services:
    svc = services(request)
    if not svc.admin_key:
        raise NotFound("The admin API is disabled: set GATEWAY_ADMIN_KEY.", code="admin_disabled")
    if not admin_key_matches(svc, request.headers.get("authorization", "")):
        raise Unauthorized("A valid admin key is required.")
    request.scope["state"]["key_id"] = "admin"
    return svc


Admin = Annotated[Services, Depends(_authorized)]
Days = Annotated[int, Query(ge=1, le=400, description="Days back, today included.")]
router = APIRouter(tags=["admin"])
_ADMIN_ERRORS = (401, 404)


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


def _provider(svc: Services, name: str) -> str:
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


@router.api_route(
    methods=["GET", "HEAD"],
    path="/admin/providers",
    summary="Every provider's shared record: breaker, latency, price, drain",
    response_model=None,
    responses=answers(ProviderStates, *_ADMIN_ERRORS),
)
async def list_providers(svc: Admin) -> Response:
    return _json({"object": "list", "data": await provider_states(svc)})


@router.api_route(
    "/admin/providers/{name}/drain",
    methods=["PUT", "DELETE"],
    summary="Drain (PUT) or undrain (DELETE) a provider on every replica",
    response_model=None,
    responses=answers(Drained, *_ADMIN_ERRORS),
)
async def drain(request: Request, svc: Admin, name: str) -> Response:
    name = _provider(svc, name)
    drained = request.method == "PUT"
    await svc.store.set_drained(name, drained)
    svc.router.forget()
    _changed(request, "drain" if drained else "undrain", name)
    return _json({"provider": name, "drained": drained})


@router.api_route(
    "/admin/providers/{name}/price",
    methods=["PUT", "DELETE"],
    summary="Set (PUT) or reset to the config's (DELETE) a provider's price, on every replica",
    response_model=None,
    responses=answers(Priced, 400, *_ADMIN_ERRORS),
    # Read by the handler, which answers in the gateway's own error shape; PUT only
    # (openapi.py drops it from DELETE).
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PriceChange.model_json_schema()}},
        }
    },
)
async def price(request: Request, svc: Admin, name: str) -> Response:
    name = _provider(svc, name)
    if request.method == "DELETE":
        return await _priced(request, svc, name, None)
    try:
        raw = orjson.loads(await request.body())
        value = raw["price_usd"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise InvalidRequest(
            'Send JSON: {"price_usd": <USD per image>}.', param="price_usd"
        ) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 100:
        raise InvalidRequest("'price_usd' must be a number from 0 to 100.", param="price_usd")
    return await _priced(request, svc, name, float(value))


async def _priced(request: Request, svc: Services, name: str, value: float | None) -> Response:
    await svc.store.set_price(name, value)
    svc.router.forget()
    _changed(request, "set_price" if value is not None else "reset_price", name, price_usd=value)
    return _json({"provider": name, "price_usd": value, "from_config": value is None})


@router.post(
    "/admin/providers/{name}/reset",
    summary="Close a provider's breaker on every replica",
    response_model=None,
    responses=answers(BreakerReset, *_ADMIN_ERRORS),
)
async def reset(request: Request, svc: Admin, name: str) -> Response:
    name = _provider(svc, name)
    await svc.store.reset_breaker(name)
    svc.router.forget()
    _changed(request, "reset_breaker", name)
    return _json({"provider": name, "circuit": "closed"})


@router.api_route(
    methods=["GET", "HEAD"],
    path="/admin/spend",
    summary="Every key's spend by day",
    response_model=None,
    responses=answers(Spend, 400, *_ADMIN_ERRORS, 503),
)
async def spend(svc: Admin, days: Days = 7) -> Response:
    report = await svc.accounts.report(days)
    report["simulated"] = svc.sandbox
    return _json(report)
