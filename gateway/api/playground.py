"""GET /playground: a page to try the gateway in a browser. It is plain HTML and JS from
gateway/pages and gateway/static (no CDN, no framework) and calls the public API, POST
/v1/images/edits, with the key the user types, exactly as any client would: it has no
privileged path of its own."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import FileResponse

from gateway.api.context import services
from gateway.api.docs import STATIC_DIR

router = APIRouter(include_in_schema=False)
# Outside static/, which is served as is: the page only ever goes out with its CSP below.
PAGE = STATIC_DIR.parent / "pages" / "playground.html"


def _policy(public_url: str | None) -> str:
    """Nothing but this origin: the page sends the user's key and images, so a browser
    enforces that they go nowhere else. Result URLs are signed with GATEWAY_PUBLIC_URL, which
    may name another origin than the one the page was opened on."""
    images = "'self' blob: data:"
    if public_url:
        parts = urlsplit(public_url)
        if parts.scheme and parts.netloc:
            images += f" {parts.scheme}://{parts.netloc}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        f"img-src {images}; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


@router.api_route("/playground", methods=["GET", "HEAD"])
async def playground(request: Request) -> FileResponse:
    return FileResponse(
        PAGE,
        media_type="text/html; charset=utf-8",
        headers={
            "content-security-policy": _policy(services(request).public_url),
            "cache-control": "no-cache",
            "referrer-policy": "no-referrer",
        },
    )
