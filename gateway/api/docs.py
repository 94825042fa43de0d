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


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return HTMLResponse(_SWAGGER)


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return HTMLResponse(_REDOC)


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
