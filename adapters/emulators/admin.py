"""Admin routes every emulator has: fault script at run time, recorded requests, counters,
and the jobs (which input each billed for, and the bill). Open unless the emulator's config
names an admin key (the gateway's sandbox does); then each asks for it."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.emulators.faults import FaultScript
from adapters.emulators.jobs import MICROS, EmulatorState


def admin_routes(state: EmulatorState) -> list[Route]:
    async def get_faults(request: Request) -> Response:
        return JSONResponse(state.dice.script.model_dump())

    async def set_faults(request: Request) -> Response:
        try:
            body: dict[str, Any] = await request.json()
            if request.method == "PATCH":
                body = {**state.dice.script.model_dump(), **body}
            script = FaultScript.model_validate(body)
        except (ValueError, ValidationError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        state.dice.replace(script)
        return JSONResponse(script.model_dump())

    async def list_requests(request: Request) -> Response:
        return JSONResponse({"requests": list(state.requests)})

    async def clear_requests(request: Request) -> Response:
        state.requests.clear()
        return Response(status_code=204)

    async def stats(request: Request) -> Response:
        return JSONResponse(dict(state.stats))

    async def jobs(request: Request) -> Response:
        # billed_micros is every job billed since start (evicted ones too): an exact running
        # total to take differences of; the list holds the newest max_jobs jobs.
        return JSONResponse(
            {
                "jobs": [
                    {
                        "id": j.id,
                        "state": j.state,
                        "fault": j.fault,
                        "input_sha256": j.extra.get("input_sha256"),
                        "priority": j.extra.get("priority", "normal"),
                        "billed": j.billed,
                        "price_usd": j.price_micros / MICROS,
                        "price_micros": j.price_micros,
                        "created_at": j.created_at,
                        "completed_at": j.completed_at,
                    }
                    for j in state.jobs.values()
                ],
                "billed_micros": state.billed_micros,
                "billed_usd": state.billed_micros / MICROS,
                "price_usd": state.price_micros / MICROS,
                "hanging": state.hanging,  # submits in a hang: not jobs (yet)
            }
        )

    guard = _guarded(state.config.admin_key)
    return [
        Route("/_emulator/faults", guard(get_faults), methods=["GET"]),
        Route("/_emulator/faults", guard(set_faults), methods=["PUT", "PATCH"]),
        Route("/_emulator/requests", guard(list_requests), methods=["GET"]),
        Route("/_emulator/requests", guard(clear_requests), methods=["DELETE"]),
        Route("/_emulator/stats", guard(stats), methods=["GET"]),
        Route("/_emulator/jobs", guard(jobs), methods=["GET"]),
    ]


Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(admin_key: str | None) -> Callable[[Endpoint], Endpoint]:
    """Wraps an endpoint to ask for the admin key; with none configured, leaves it be."""

    def guard(endpoint: Endpoint) -> Endpoint:
        if admin_key is None:
            return endpoint
        expected = admin_key.encode()

        async def checked(request: Request) -> Response:
            # Either provider's scheme, so a client holding the key speaks its own.
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            if scheme not in ("Bearer", "Key") or not secrets.compare_digest(
                presented.strip().encode(), expected
            ):
                return JSONResponse(
                    {"detail": "The emulator's admin routes need its admin key."},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await endpoint(request)

        return checked

    return guard
