"""/docs (Swagger UI) and /redoc over /openapi.json, with their scripts and styles served
from the package (gateway/static/vendor): no CDN, so they work offline and send nothing off
the host."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
VENDOR = "/static/vendor"
router = APIRouter(include_in_schema=False)

_SWAGGER = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>upscale-gateway API</title>
<link rel="icon" href="{VENDOR}/swagger-ui/favicon-32x32.png">
<link rel="stylesheet" href="{VENDOR}/swagger-ui/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="{VENDOR}/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script>
</body></html>"""

_REDOC = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>upscale-gateway API</title>
<style>body {{ margin: 0; }}</style>
</head><body><redoc spec-url="/openapi.json" hide-download-button></redoc>
<script src="{VENDOR}/redoc/redoc.standalone.js"></script>
</body></html>"""


# Same-origin only: ReDoc 2.5 loads its sidebar badge from cdn.redoc.ly whatever its
# options say, and a browser must send nothing (the document, a key) off the host.
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; worker-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@router.api_route("/docs", methods=["GET", "HEAD"])
async def swagger_ui() -> HTMLResponse:
    return HTMLResponse(_SWAGGER, headers={"content-security-policy": _CSP})


@router.api_route("/redoc", methods=["GET", "HEAD"])
async def redoc() -> HTMLResponse:
    return HTMLResponse(_REDOC, headers={"content-security-policy": _CSP})


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
