"""The Files API: batch input files uploaded with a client key (POST /v1/files, streamed to
the store), their listing, metadata, content and deletion, owner only; and beside them the
result images behind signed, expiring URLs (`img_` ids), from whichever store keeps them (a
local file, or an object streamed from the bucket in bounded chunks, so any replica serves
any replica's result)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse

from gateway.api.body import read_upload
from gateway.api.context import AccountId, AppServices, BatchesDep, account_id
from gateway.api.openapi import answers
from gateway.batch.model import CURSOR_PATTERN
from gateway.batch.service import PURPOSES, BatchService
from gateway.errors import InvalidRequest, NotFound, Unauthorized

router = APIRouter(tags=["files"])


class ResultFile(FileResponse):
    # Results are megabytes: 1 MiB reads mean a sixteenth of the worker-thread hops of
    # Starlette's 64 KiB default, for a bounded buffer per response.
    chunk_size = 1 << 20


_IMAGE = {"description": "The image.", "content": {"image/*": {"schema": {"type": "string"}}}}


@router.api_route(
    "/v1/files/{file_id}/content",
    methods=["GET", "HEAD"],
    summary="A result image (the signed URL of an images response)",
    response_model=None,
    responses={**answers(None, 400, 401, 404, 503), 200: _IMAGE},
)
async def file_content(
    request: Request,
    svc: AppServices,
    batches: BatchesDep,
    file_id: str,
    # Optional here, so that a URL without them is the 401 of any unsigned URL.
    expires: Annotated[
        int | None, Query(ge=0, le=2**53, description="Unix time the URL expires.")
    ] = None,
    signature: Annotated[str | None, Query(max_length=128, description="The URL's HMAC.")] = None,
) -> Response:
    if file_id.startswith("file-"):  # an uploaded or batch output file: its owner's key
        return await _batch_file(batches, request, file_id)
    if expires is None or signature is None or not svc.signer.verify(file_id, expires, signature):
        raise Unauthorized(
            "The file URL's signature is invalid or has expired.", code="invalid_signature"
        )
    blob = await svc.edits.open_result(file_id, body=request.method != "HEAD")
    if blob is None:
        raise NotFound(f"No file '{file_id[:80]}' (results expire).", code="file_not_found")
    headers = {"cache-control": f"private, max-age={svc.config.results.ttl_s}"}
    if blob.path is not None:
        return ResultFile(blob.path, media_type=blob.content_type, headers=headers)
    headers["content-length"] = str(blob.size)
    return StreamingResponse(
        blob.chunks or _nothing(), media_type=blob.content_type, headers=headers
    )


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator with no items (a HEAD's body)


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def _batch_file(batches: BatchService, request: Request, file_id: str) -> Response:
    meta, chunks = await batches.content(account_id(request), file_id)
    if request.method == "HEAD":
        return Response(headers={"content-length": str(meta.bytes)}, media_type="application/jsonl")
    first = chunks.__aiter__()
    try:
        head = await first.__anext__()
    except StopAsyncIteration:
        head = b""
    except FileNotFoundError:
        raise NotFound(f"No such file: '{file_id[:80]}'.", code="file_not_found") from None

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in first:
            yield chunk

    return StreamingResponse(
        body(),
        media_type="application/jsonl",
        headers={"content-length": str(meta.bytes), "cache-control": "private, no-store"},
    )


@router.post(
    "/v1/files",
    summary="Upload a batch input file (JSONL, multipart `file`, `purpose=batch`)",
    response_model=None,
    responses=answers(None, 400, 401, 408, 413, 415, 429),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "additionalProperties": False,
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"type": "string", "enum": list(PURPOSES)},
                        },
                    }
                }
            },
        }
    },
)
async def upload_file(
    request: Request, svc: AppServices, batches: BatchesDep, account: AccountId
) -> Response:
    config = svc.config
    limit = config.batch.max_file_bytes
    await svc.accounts.precheck(account)
    async with read_upload(
        request, limit, config.limits.body_idle_timeout_s, config.batch.upload_timeout_s
    ) as upload:
        unknown = sorted(set(upload.fields) - {"purpose"})
        if unknown:
            name = unknown[0][:60]
            raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name)
        purpose = upload.fields.get("purpose", "")
        if purpose not in PURPOSES:
            raise InvalidRequest(
                f"'purpose' must be one of {', '.join(PURPOSES)}; this gateway keeps batch "
                "input files only.",
                param="purpose",
            )
        meta = await batches.upload(account, upload.file.filename or "", purpose, upload.chunks())
    return _json(meta.public())


@router.get(
    "/v1/files",
    summary="List your files",
    response_model=None,
    responses=answers(None, 400, 401),
)
async def list_files(
    batches: BatchesDep,
    account: AccountId,
    purpose: Literal["batch", "batch_output"] | None = None,
    after: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
) -> Response:
    return _json(await batches.files(account, purpose, after, limit, order))


@router.get(
    "/v1/files/{file_id}",
    summary="A file's metadata",
    response_model=None,
    responses=answers(None, 401, 404),
)
async def retrieve_file(batches: BatchesDep, account: AccountId, file_id: str) -> Response:
    return _json((await batches.file(account, file_id)).public())


@router.delete(
    "/v1/files/{file_id}",
    summary="Delete a file",
    response_model=None,
    responses=answers(None, 401, 404),
)
async def delete_file(batches: BatchesDep, account: AccountId, file_id: str) -> Response:
    return _json(await batches.delete_file(account, file_id))
