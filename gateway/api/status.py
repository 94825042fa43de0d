"""GET /status: one page an operator opens in a browser (providers' health and latency,
requests and failovers in the last hour, spend today, cache hit rate), server-rendered from
the same figures as GET /status.json. Every figure comes from the shared state store, so
each replica shows the same page.

Access: the admin key, as a Bearer token or as the password of HTTP Basic auth (a browser
asks for it). Without GATEWAY_ADMIN_KEY the page is open in development and off otherwise."""

from __future__ import annotations

import base64
import hmac
import logging
import time
from html import escape
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from gateway.accounts import day_row, sum_days
from gateway.api.admin import admin_key_matches, provider_states
from gateway.api.context import Services, services
from gateway.api.openapi import answers
from gateway.api.schemas import StatusFigures
from gateway.errors import NotFound, Unauthorized
from gateway.state.base import Period

log = logging.getLogger("gateway.status")

REFRESH_S = 10
SIMULATED = "simulated (sandbox: nothing is billed)"


async def _allowed(request: Request) -> Services:
    svc = _check(request)
    request.scope["state"]["key_id"] = "admin" if svc.admin_key else None
    return svc


def _check(request: Request) -> Services:
    svc = services(request)
    if not svc.admin_key:
        if svc.status_open:
            return svc
        raise NotFound("The status page needs GATEWAY_ADMIN_KEY outside development.")
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):  # binascii.Error, and non-ASCII text
            password = ""
        if hmac.compare_digest(password.encode(), svc.admin_key.encode()):
            return svc
    elif admin_key_matches(svc, header):
        return svc
    raise Unauthorized(
        "The status page needs the admin key (as the password).",
        headers={"www-authenticate": 'Basic realm="upscale-gateway status"'},
    )


async def figures(svc: Services) -> dict[str, Any]:
    now = time.time()
    today = Period.of(now).day
    events = await svc.store.recent_events(now, 60)
    spent = sum_days(await svc.store.ledger(None, [today]), today)
    hits = events.get("cache_hits", 0) + events.get("cache_coalesced", 0)
    lookups = hits + events.get("cache_misses", 0)
    names = ("requests", "errors", "limited", "failovers", "hedges")
    return {
        "generated_at": int(now),
        "sandbox": svc.sandbox,
        # In sandbox mode the emulators "bill": figures to try the gateway with, not money.
        "simulated": svc.sandbox,
        "state_store": {
            "kind": svc.store.kind,
            "degraded": bool(getattr(svc.store, "degraded", False)),
        },
        "providers": await provider_states(svc),
        "last_hour": {name: events.get(name, 0) for name in names},
        "cache": {
            "enabled": svc.config.cache.enabled,
            "hits": hits,
            "misses": events.get("cache_misses", 0),
            "hit_rate": round(hits / lookups, 4) if lookups else None,
        },
        "spend_today": {"date": today, **day_row(spent), "simulated": svc.sandbox},
        "batches": await _batches(svc),
    }


async def _batches(svc: Services) -> dict[str, Any] | None:
    """The batches still running on every replica, their lines done and spend so far."""
    if svc.batches is None:
        return None
    try:
        return await svc.batches.progress()
    except Exception as exc:  # the records are away: the page still shows the rest
        log.warning("status: batch progress unavailable: %s", type(exc).__name__)
        return {"unavailable": True}


Allowed = Annotated[Services, Depends(_allowed)]
router = APIRouter(tags=["status"])


@router.api_route(
    methods=["GET", "HEAD"],
    path="/status.json",
    summary="The status page's figures",
    response_model=None,
    responses=answers(StatusFigures, 401, 404, 503),
)
async def status_json(svc: Allowed) -> Response:
    return Response(orjson.dumps(await figures(svc)), media_type="application/json")


@router.api_route(
    methods=["GET", "HEAD"],
    path="/status",
    summary="The status page (HTML; a browser asks for the admin key as a password)",
    response_model=None,
    responses=answers(None, 401, 404, 503, media="text/html"),
)
async def status_page(svc: Allowed) -> Response:
    return HTMLResponse(render(await figures(svc)))


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render(f: dict[str, Any]) -> str:
    rows = []
    for p in f["providers"]:
        circuit = p["circuit"] + (" (drained)" if p["drained"] else "")
        rows.append(
            f'<tr data-provider="{escape(p["provider"])}"><th>{escape(p["provider"])}</th>'
            f'<td class="circuit {escape(p["circuit"])}">{escape(circuit)}</td>'
            f"<td>{_seconds(p['p50_s'])}</td><td>{_seconds(p['p95_s'])}</td>"
            f"<td>{p['error_rate'] * 100:.1f} %</td><td>{p['successes']} / {p['failures']}</td>"
            f"<td>${p['price_usd']:.4f}</td><td>{escape(p['last_error'][:120])}</td></tr>"
        )
    hour, cache, spend = f["last_hour"], f["cache"], f["spend_today"]
    rate = "n/a" if cache["hit_rate"] is None else f"{cache['hit_rate'] * 100:.1f} %"
    by_provider = ", ".join(
        f"{escape(name)} ${v['spend_usd']:.4f} (images: {v['images']})"
        for name, v in sorted(spend["by_provider"].items())
    )
    figures_list = [
        ("requests", "Requests (last hour)", hour["requests"], False),
        ("failovers", "Failovers (last hour)", hour["failovers"], False),
        ("errors", "Server errors (last hour)", hour["errors"], False),
        ("limited", "Refused by limits (last hour)", hour["limited"], False),
        ("spend", "Spend today (UTC)", f"${spend['spend_usd']:.4f}", spend["simulated"]),
        ("cache-hit-rate", "Cache hit rate (last hour)", rate, False),
    ]
    batches = f.get("batches") or {}
    if "running" in batches:
        done = f"{batches['lines_done']} / {batches['lines_total']}"
        figures_list += [
            ("batches-running", "Batches running", batches["running"], False),
            ("batch-lines", "Batch lines done", done, False),
            ("batch-spend", "Running batches' spend", f"${batches['spend_usd']:.4f}", False),
        ]
    # The note sits beside the value, not in it: the value stays the bare figure.
    tiles = "".join(
        f'<div class="tile{" simulated" if simulated else ""}"><div class="label">{label}</div>'
        f'<div class="value" id="{ident}">{value}</div>'
        + (f'<div class="note" id="{ident}-simulated">{SIMULATED}</div>' if simulated else "")
        + "</div>"
        for ident, label, value, simulated in figures_list
    )
    store = f["state_store"]
    mode = "sandbox (emulated providers, spend is simulated)" if f["sandbox"] else "live"
    updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f["generated_at"]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>upscale-gateway status</title>
<style>
body {{ font: 15px system-ui, sans-serif; margin: 2rem; color: #1d2330; background: #f6f7f9; }}
h1 {{ font-size: 1.4rem; margin: 0 0 .3rem; }}
.meta {{ color: #5b6475; margin-bottom: 1.2rem; }}
.tiles {{ display: flex; flex-wrap: wrap; gap: .8rem; margin-bottom: 1.5rem; }}
.tile {{ background: #fff; border: 1px solid #dde1e8; border-radius: 8px; padding: .8rem 1rem;
  min-width: 11rem; }}
.label {{ color: #5b6475; font-size: .8rem; }}
.value {{ font-size: 1.5rem; font-weight: 600; margin-top: .2rem; }}
.tile.simulated {{ border-color: #e0b44a; background: #fffaf0; }}
.note {{ color: #7a4d00; font-size: .8rem; margin-top: .2rem; }}
table {{ border-collapse: collapse; background: #fff; width: 100%; }}
th, td {{ border: 1px solid #dde1e8; padding: .45rem .6rem; text-align: left; }}
thead th {{ background: #eef0f4; font-size: .85rem; }}
.circuit.closed {{ color: #137333; }} .circuit.open {{ color: #b3261e; font-weight: 600; }}
.circuit.half_open {{ color: #a15c00; }}
</style></head>
<body>
<h1>upscale-gateway</h1>
<div class="meta">Mode: {mode} &middot; state store: {escape(store["kind"])}
{"(degraded: this replica's view)" if store["degraded"] else ""} &middot; updated {updated}
&middot; refreshes every {REFRESH_S} s</div>
<div class="tiles">{tiles}</div>
<h2>Providers</h2>
<table id="providers"><thead><tr><th>Provider</th><th>Circuit</th><th>p50</th><th>p95</th>
<th>Error rate (1 min)</th><th>OK / failed (1 min)</th><th>Price / image</th><th>Last error</th>
</tr></thead><tbody>{"".join(rows)}</tbody></table>
<p class="meta">Spend today by provider{f", {SIMULATED}" if spend["simulated"] else ""}:
{by_provider or "none yet"}.
Cache: {cache["hits"]} hits, {cache["misses"]} misses in the last hour.</p>
</body></html>
"""
