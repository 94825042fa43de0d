"""GET /v1/models and /v1/models/{id}, shaped as OpenAI shapes them."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.context import services
from gateway.errors import NotFound
from gateway.params import json_schema


def _model(request: Request, model_id: str) -> dict[str, Any]:
    config = services(request).config
    body: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": config.model.created,
        "owned_by": config.model.owned_by,
    }
    if request.query_params.get("schema", "").lower() in ("1", "true", "yes"):
        body["parameters"] = json_schema(config)
    return body


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


async def list_models(request: Request) -> Response:
    svc = services(request)
    ids = [svc.config.model.id, *sorted(svc.pinned_models)]
    return _json({"object": "list", "data": [_model(request, i) for i in ids]})


async def get_model(request: Request) -> Response:
    svc = services(request)
    # Newer SDKs percent-encode ids that contain '/', so aliases like fal's arrive encoded.
    model_id = unquote(request.path_params["model_id"])
    if model_id not in svc.model_ids:
        raise NotFound(
            f"The model '{model_id[:100]}' does not exist.", param="model", code="model_not_found"
        )
    return _json(_model(request, model_id))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
