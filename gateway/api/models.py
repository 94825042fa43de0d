"""GET /v1/models and /v1/models/{id}, shaped as OpenAI shapes them."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote

import orjson
from fastapi import APIRouter, Path, Query
from starlette.responses import Response

from gateway.api.context import CatalogDep, Config
from gateway.api.openapi import answers
from gateway.api.schemas import Model, ModelList
from gateway.config import GatewayConfig
from gateway.errors import NotFound
from gateway.params import json_schema

router = APIRouter(tags=["models"])
WithSchema = Annotated[
    bool, Query(alias="schema", description="Add the request body's JSON Schema.")
]


def _model(config: GatewayConfig, model_id: str, schema: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": config.model.created,
        "owned_by": config.model.owned_by,
    }
    if schema:
        body["parameters"] = json_schema(config)
    return body


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.api_route(
    methods=["GET", "HEAD"],
    path="/v1/models",
    summary="List the model and its provider-pinned ids",
    response_model=None,
    responses=answers(ModelList, 400, 401),
)
async def list_models(config: Config, catalog: CatalogDep, schema: WithSchema = False) -> Response:
    return _json({"object": "list", "data": [_model(config, i, schema) for i in catalog.listed()]})


@router.api_route(
    methods=["GET", "HEAD"],
    path="/v1/models/{model_id:path}",
    summary="One model (with ?schema=true, its parameters)",
    response_model=None,
    responses=answers(Model, 400, 401, 404),
)
async def get_model(
    config: Config,
    catalog: CatalogDep,
    model_id: Annotated[str, Path(description="A model id; ids with '/' may be encoded.")],
    schema: WithSchema = False,
) -> Response:
    # Newer SDKs percent-encode ids that contain '/', so aliases like fal's arrive encoded.
    model_id = unquote(model_id)
    if model_id not in catalog.ids:
        raise NotFound(
            f"The model '{model_id[:100]}' does not exist.", param="model", code="model_not_found"
        )
    return _json(_model(config, model_id, schema))
