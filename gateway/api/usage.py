"""GET /v1/usage: the calling key's own spend, limits and requests, by day."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.accounts import OPEN_ACCOUNT
from gateway.api.admin import days_param
from gateway.api.context import services


async def usage(request: Request) -> Response:
    svc = services(request)
    account = request.scope["state"].get("key_id") or OPEN_ACCOUNT
    body = await svc.accounts.usage(account, days_param(request))
    return Response(orjson.dumps(body), media_type="application/json")


routes = [Route("/v1/usage", usage, methods=["GET"])]
