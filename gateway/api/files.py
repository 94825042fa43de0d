"""GET /v1/files/{id}/content: result images behind signed, expiring URLs."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from gateway.api.context import services
from gateway.errors import NotFound, Unauthorized


class ResultFile(FileResponse):
    # Results are megabytes: 1 MiB reads mean a sixteenth of the worker-thread hops of
    # Starlette's 64 KiB default, for a bounded buffer per response.
    chunk_size = 1 << 20


async def file_content(request: Request) -> Response:
    svc = services(request)
    file_id = request.path_params["file_id"]
    expires = request.query_params.get("expires", "")
    signature = request.query_params.get("signature", "")
    if not expires.isdigit() or not svc.signer.verify(file_id, int(expires), signature):
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


routes = [Route("/v1/files/{file_id}/content", file_content, methods=["GET", "HEAD"])]
