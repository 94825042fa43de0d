"""GET /: where a first visit starts. One server-rendered page, no script and nothing fetched
from elsewhere: the mode (sandbox or live), the model, the providers, links to the docs,
status page and playground, and a curl and an OpenAI SDK example against this gateway.

The base URL in the examples is GATEWAY_PUBLIC_URL, else the one the request came in on;
it is display text only (escaped, never followed). `curl_example` is also what
`python -m gateway` prints as its first step, so the two never disagree."""

from __future__ import annotations

import json
import shlex
from html import escape
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse

from gateway import __version__
from gateway.api.context import AppServices

router = APIRouter(include_in_schema=False)

SANDBOX_MODE = "sandbox: emulated providers, nothing is billed"
_LINKS = (
    ("/docs", "API reference (Swagger UI)"),
    ("/redoc", "API reference (ReDoc)"),
    ("/openapi.json", "OpenAPI document"),
    ("/playground", "Playground: upscale an image in the browser"),
    ("/status", "Status: providers, requests, spend"),
    ("/v1/models", "Models (OpenAI format)"),
)
# Inline style only, so the page needs nothing from anywhere (the browser enforces it).
_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def curl_example(base_url: str, model: str, keyed: bool) -> str:
    """One upscale of a local source.png, as a shell line that works as printed."""
    parts = [
        "curl -s",
        shlex.quote(f"{base_url.rstrip('/')}/v1/images/edits"),
        "-F image=@source.png",
        "-F " + shlex.quote(f"model={model}"),
        "-F scale_factor=2",
    ]
    if keyed:
        parts.append('-H "Authorization: Bearer $KEY"')
    return " ".join(parts)


def python_example(base_url: str, model: str, keyed: bool) -> str:
    api_key = 'os.environ["KEY"],' if keyed else '"unused",  # no client keys configured'
    return "\n".join(
        [
            *(["import os", ""] if keyed else []),
            "from openai import OpenAI",
            "",
            "client = OpenAI(",
            f"    base_url={json.dumps(base_url.rstrip('/') + '/v1')},",
            f"    api_key={api_key}",
            ")",
            "result = client.images.edit(",
            f"    model={json.dumps(model)},",
            '    image=open("source.png", "rb"),',
            '    prompt="upscale",  # the SDK requires one; the model ignores it',
            '    extra_body={"scale_factor": 2},',
            ")",
            "print(result.data[0].url)",
        ]
    )


def _provider_rows(providers: list[dict[str, Any]]) -> str:
    rows = []
    for p in providers:  # base URLs stay off the page: /readyz has them
        if p["enabled"]:
            state = "enabled, emulated" if p["emulated"] else "enabled"
        else:
            state = f"disabled: {p.get('reason', '')}"
        rows.append(
            f'<tr data-provider="{escape(p["name"])}"><th>{escape(p["name"])}</th>'
            f"<td>{escape(str(p['model']))}</td><td>${float(p['price_usd']):.4f}</td>"
            f'<td class="{"on" if p["enabled"] else "off"}">{escape(state)}</td></tr>'
        )
    return "".join(rows)


@router.api_route("/", methods=["GET", "HEAD"])
async def landing(request: Request, svc: AppServices) -> HTMLResponse:
    base_url = svc.base_url(request)  # never the Host header a client sent
    model = svc.config.model.id
    keyed = svc.client_keys
    links = "".join(f'<li><a href="{href}">{href}</a> {text}</li>' for href, text in _LINKS)
    kind = "sandbox" if svc.sandbox else "live"
    text = SANDBOX_MODE if svc.sandbox else "live: real providers, billed per image"
    mode = f'<span id="mode" class="mode {kind}">{escape(text)}</span>'
    key_note = (
        "Client keys are configured: export one as <code>KEY</code> first."
        if keyed
        else "No client keys are configured: any client is accepted (development only)."
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>upscale-gateway</title>
<style>
body {{ font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 54rem; padding: 0 1rem;
  color: #1d2330; background: #f6f7f9; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }} h2 {{ font-size: 1.1rem; margin-top: 1.6rem; }}
.meta {{ color: #5b6475; }}
.mode {{ display: inline-block; padding: .3rem .6rem; border-radius: 6px; font-weight: 600; }}
.mode.sandbox {{ background: #fff4d6; color: #7a4d00; }}
.mode.live {{ background: #e3f4e8; color: #137333; }}
table {{ border-collapse: collapse; background: #fff; }}
th, td {{ border: 1px solid #dde1e8; padding: .4rem .6rem; text-align: left; }}
td.on {{ color: #137333; }} td.off {{ color: #b3261e; }}
pre {{ background: #1d2330; color: #f6f7f9; padding: .8rem 1rem; border-radius: 6px;
  overflow-x: auto; }}
#curl {{ white-space: pre-wrap; overflow-wrap: anywhere; }}
li {{ margin: .2rem 0; }}
</style></head>
<body>
<h1>upscale-gateway</h1>
<p class="meta">An OpenAI-compatible image upscaling gateway, version {escape(__version__)}.</p>
<p>Mode: {mode}</p>
<p>Model: <code id="model">{escape(model)}</code>, served by these providers, with
failover from one to the next:</p>
<table id="providers"><thead><tr><th>Provider</th><th>Upstream model</th><th>Price / image</th>
<th>State</th></tr></thead><tbody>{_provider_rows(svc.provider_status)}</tbody></table>
<h2>Links</h2>
<ul id="links">{links}</ul>
<h2>Try it</h2>
<p>{key_note} Save any PNG, JPEG or WebP as <code>source.png</code>, then:</p>
<pre id="curl">{escape(curl_example(base_url, model, keyed))}</pre>
<p>Or with the OpenAI Python SDK (<code>pip install openai</code>):</p>
<pre id="python">{escape(python_example(base_url, model, keyed))}</pre>
<p class="meta">The answer holds a URL of the upscaled image, served by this gateway.</p>
</body></html>
"""
    return HTMLResponse(page, headers={"content-security-policy": _POLICY})
