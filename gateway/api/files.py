"""GET /v1/files/{id}/content: result images behind signed, expiring URLs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import FileResponse, Response

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
    responses={**answers(None, 400, 401, 404), 200: _IMAGE},
)
async def file_content(
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
    path = svc.result_path(file_id)
    content_type = svc.results.content_type(file_id)
    if path is None or content_type is None:
        raise NotFound(f"No file '{file_id[:80]}' (results expire).", code="file_not_found")
    return ResultFile(
        path,
        media_type=content_type,
        headers={"cache-control": f"private, max-age={svc.config.results.ttl_s}"},
    )
