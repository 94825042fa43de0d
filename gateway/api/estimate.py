"""`POST /v1/images/edits?dryRun=true`: the request validated as a real one would be (its
fields, its image, which providers can take it, the plan routing would make), and what it
would cost, without calling a provider, holding budget or spending."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.accounts import micros
from gateway.api.body import EditBody
from gateway.api.context import Services, request_id
from gateway.params import UpscaleParams
from gateway.routing.preferences import Preferences


async def estimate(
    request: Request, svc: Services, body: EditBody, params: UpscaleParams, prefs: Preferences
) -> Response:
    data = body.image if body.image is not None else await svc.fetcher.load(body.image_ref or "")
    source = await svc.upscaler.prepare(data, prefs)
    plan = await svc.router.plan(
        prefs,
        params.required_flags(),
        request_id(request),
        source.prepared.unfit,
    )
    lead = plan[0].entry
    unit = micros(lead.price_usd)
    body_out = {
        "estimated": True,
        "model": params.model,
        "provider": lead.name,
        "total_cost_micros": unit * params.n,
        "currency": "USD",
        "components": [
            {
                "type": "image",
                "provider": lead.name,
                "quantity": params.n,
                "unit_cost_micros": unit,
                "cost_micros": unit * params.n,
            }
        ],
        # If the first provider fails, a fallback may cost more (at most this per image).
        "fallbacks": [c.entry.name for c in plan[1:]],
        "max_cost_micros": max(micros(c.entry.price_usd) for c in plan) * params.n,
    }
    return Response(orjson.dumps(body_out), media_type="application/json")
