"""GET /v1/files/{id}/content: result images behind signed, expiring URLs, from whichever
store keeps them (a local file, or an object streamed from the bucket in bounded chunks, so
any replica serves any replica's result)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse

from gateway.api.context import AppServices
from gateway.api.openapi import answers
from gateway.errors import NotFound, Unauthorized

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
    file_id: str,
    # Optional here, so that a URL without them is the 401 of any unsigned URL.
    expires: Annotated[
        int | None, Query(ge=0, le=2**53, description="Unix time the URL expires.")
    ] = None,
    signature: Annotated[str | None, Query(max_length=128, description="The URL's HMAC.")] = None,
) -> Response:
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
