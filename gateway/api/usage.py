"""GET /v1/usage: the calling key's own spend, limits and requests, by day."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.accounts import OPEN_ACCOUNT
from gateway.api.admin import Days
from gateway.api.context import AccountsDep, Sandboxed
from gateway.api.openapi import answers
from gateway.api.schemas import Usage

router = APIRouter(tags=["usage"])


@router.api_route(
    methods=["GET", "HEAD"],
    path="/v1/usage",
    summary="The calling key's spend, limits and requests",
    response_model=None,
    responses=answers(Usage, 400, 401, 503),
)
async def usage(
    request: Request, accounts: AccountsDep, sandbox: Sandboxed, days: Days = 7
) -> Response:
    account = request.scope["state"].get("key_id") or OPEN_ACCOUNT
    body = await accounts.usage(account, days)
    # In sandbox mode the emulators "bill": figures to try the API with, not money.
    body["simulated"] = sandbox
    return Response(orjson.dumps(body), media_type="application/json")
