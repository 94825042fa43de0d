"""The Batch API in OpenAI's shapes: POST /v1/batches over an uploaded JSONL file of
/v1/images/edits requests, GET one or a page of them, and cancel. Parse and answer only:
gateway/batch runs them."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.context import AccountId, AppServices, BatchesDep
from gateway.api.openapi import answers
from gateway.batch.model import CURSOR_PATTERN, ENDPOINT, WINDOW
from gateway.batch.service import MAX_METADATA
from gateway.errors import InvalidRequest

router = APIRouter(tags=["batches"])
MAX_BODY = 64 * 1024


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


_CREATE = {
    "type": "object",
    "required": ["input_file_id", "endpoint", "completion_window"],
    "additionalProperties": False,
    "properties": {
        "input_file_id": {"type": "string", "description": "A file uploaded with purpose=batch"},
        "endpoint": {"type": "string", "enum": [ENDPOINT]},
        "completion_window": {"type": "string", "enum": [WINDOW]},
        "metadata": {
            "anyOf": [
                {
                    "type": "object",
                    "maxProperties": MAX_METADATA,
                    "propertyNames": {"maxLength": 64},
                    "additionalProperties": {"type": "string", "maxLength": 512},
                },
                {"type": "null"},
            ]
        },
    },
}


@router.post(
    "/v1/batches",
    summary="Create a batch of image edits from an uploaded JSONL file",
    response_model=None,
    responses=answers(None, 400, 401, 404, 429),
    # Read by the handler, which answers in the gateway's own error shape.
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _CREATE}}}
    },
)
async def create_batch(
    request: Request, svc: AppServices, batches: BatchesDep, account: AccountId
) -> Response:
    await svc.accounts.precheck(account)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise InvalidRequest(f"The body is larger than {MAX_BODY} bytes.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}") from None
    state = await batches.create(account, body, svc.base_url(request))
    return _json(state.public())


@router.get(
    "/v1/batches",
    summary="List your batches, newest first",
    response_model=None,
    responses=answers(None, 400, 401),
)
async def list_batches(
    batches: BatchesDep,
    account: AccountId,
    after: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    return _json(await batches.list(account, after, limit))


@router.get(
    "/v1/batches/{batch_id}",
    summary="A batch",
    response_model=None,
    responses=answers(None, 401, 404),
)
async def retrieve_batch(batches: BatchesDep, account: AccountId, batch_id: str) -> Response:
    return _json((await batches.get(account, batch_id)).public())


@router.post(
    "/v1/batches/{batch_id}/cancel",
    summary="Cancel a batch: lines not yet running are not run",
    response_model=None,
    responses=answers(None, 401, 404, 409),
)
async def cancel_batch(batches: BatchesDep, account: AccountId, batch_id: str) -> Response:
    return _json((await batches.cancel(account, batch_id)).public())
