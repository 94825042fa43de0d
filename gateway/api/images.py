"""POST /v1/images/edits: the upscale endpoint, shaped like OpenAI's image edits. It parses
the request and answers; what the request does in between is `gateway.service`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Query
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.body import EditBody, body_limit, declared_size, read_edit_body
from gateway.api.context import (
    AccountId,
    AccountsDep,
    BodiesDep,
    CatalogDep,
    Config,
    EditsDep,
    FileUrls,
    RequestId,
)
from gateway.api.openapi import answers
from gateway.api.schemas import Estimate, ImagesResponse
from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig
from gateway.idempotency import MAX_KEY_CHARS
from gateway.params import parse_params
from gateway.routing.preferences import parse_preferences
from gateway.service import EditService, images_body, pin_model

router = APIRouter(tags=["images"])
_OK = {
    "description": "The images; with ?dryRun=true, the estimate instead.",
    "model": ImagesResponse | Estimate,
    "headers": {
        "x-upscale-provider": {"schema": {"type": "string"}, "description": "Who served."},
        "x-upscale-cost-usd": {"schema": {"type": "string"}, "description": "Billed, USD."},
        "x-upscale-attempts": {"schema": {"type": "string"}, "description": "Each attempt."},
        "x-upscale-cache": {"schema": {"type": "string"}, "description": "hit, miss, ..."},
    },
}


@router.post(
    "/v1/images/edits",
    summary="Upscale an image (OpenAI's image edits, multipart or JSON)",
    response_model=None,
    # The body is read by read_edit_body, streamed and bounded; openapi.py describes it.
    responses={
        **answers(None, 400, 401, 404, 408, 409, 413, 415, 429, 502, 503, 504),
        200: _OK,
    },
)
async def create_edit(
    request: Request,
    edits: EditsDep,
    config: Config,
    catalog: CatalogDep,
    url_for: FileUrls,
    account: AccountId,
    rid: RequestId,
    accounts: AccountsDep,
    bodies: BodiesDep,
    dry_run: Annotated[
        bool,
        Query(alias="dryRun", description="Validate and estimate the cost; call no provider."),
    ] = False,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_KEY_CHARS,
            description="A retry with the same key and body is served once and billed once.",
        ),
    ] = None,
) -> Response:
    limits = config.limits
    # The key's concurrency and rate and the process's memory for bodies are checked before
    # a byte of the body is read; the budget, which needs the body's parameters, after.
    if not dry_run:  # a dry run is admitted by nothing (it calls no provider)
        await accounts.precheck(account)
    with accounts.arriving(account):
        with bodies.hold(declared_size(request, body_limit(request, limits.max_image_bytes))):
            body = await read_edit_body(
                request, limits.max_image_bytes, limits.body_idle_timeout_s, limits.body_timeout_s
            )
        return await _answer(
            body, edits, config, catalog, url_for, account, rid, dry_run, idempotency_key
        )


async def _answer(
    body: EditBody,
    edits: EditService,
    config: GatewayConfig,
    catalog: ModelCatalog,
    url_for: Callable[[str], str],
    account: str,
    rid: str,
    dry_run: bool,
    idempotency_key: str | None,
) -> Response:
    params = parse_params(body.fields, config, text=body.form)
    text = body.form and "provider" not in body.json_parts
    prefs = parse_preferences(body.fields.get("provider"), edits.providers, text=text)
    prefs = pin_model(catalog, params, prefs)
    if dry_run:
        estimate = await edits.estimate(body, params, prefs, rid, account)
        return Response(orjson.dumps(estimate), media_type="application/json")
    edited = await edits.edit(body, params, prefs, account, rid, idempotency_key)
    content = await images_body(edited, url_for)
    return Response(content, media_type="application/json", headers=edited.headers)
