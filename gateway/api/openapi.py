"""The OpenAPI 3.1 document: FastAPI's, from the routes and their response models, plus
what FastAPI cannot see because the upscale route reads its own body (streamed and bounded,
never parsed by pydantic): both request bodies, from the same parameter table that
`parse_params` enforces, and the security schemes that the key middleware applies."""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.api.schemas import ErrorEnvelope
from gateway.config import GatewayConfig
from gateway.params import json_schema

EDITS_PATH = "/v1/images/edits"
PRICE_PATH = "/admin/providers/{name}/price"
CLIENT_KEY = "clientKey"
ADMIN_KEY = "adminKey"
_ERROR_TEXT = {
    400: "The request is invalid (the message and `param` say what).",
    401: "No valid key.",
    404: "Not found.",
    408: "The request body stopped arriving.",
    409: "The Idempotency-Key was used for another request, is in use, or its result expired.",
    413: "The body or the image is larger than the gateway accepts.",
    415: "Neither multipart/form-data nor application/json.",
    429: "A key's rate, concurrency or budget limit; Retry-After says when to retry.",
    502: "A provider answered nonsense.",
    503: "No provider can serve now, or shared state is unavailable; retry.",
    504: "The request's deadline passed.",
}
# A 48x32 PNG (the smallest side the gateway takes is 32): the example body upscales for real.
_EXAMPLE_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAADAAAAAgCAIAAADbtmxLAAAAuUlEQVR42s3WQRGEMBAF0a"
    "U1rAjEcEACMlYOEjggAlmrITP9Ae5MvRDSlek7X+e6fWLPcuxD8znXbTn2HGh0PoV3oiZq68iZKH/bkInOfidMNP9B3U"
    "T/XLgmlLMqmrD6YZkQm6aYcDvbN6G3v2nC6odlwuqHZZqu35y7SxTuKmOgG0xY/XgMlDZh9eNhUM6E1Y9XgBIm+iNcE8"
    "oU0YS1MsuEuP2KCfeM9E3oIWmafFDTFAF1TClQ2fQHpKeREn+q8NkAAAAASUVORK5CYII="
)


def answers(
    model: type[BaseModel] | None, *errors: int, description: str = "OK", media: str = ""
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`: its success body and the error envelope for each status."""
    ok: dict[str, Any] = {"description": description}
    if model is not None:
        ok["model"] = model
    if media:
        ok["content"] = {media: {"schema": {"type": "string"}}}
    out: dict[int | str, dict[str, Any]] = {200: ok}
    for status in errors:
        out[status] = {"model": ErrorEnvelope, "description": _ERROR_TEXT[status]}
    return out


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """A JSON field as parse_params reads it: null means the default (and an empty string,
    for a field that is not an object)."""
    if prop.get("type") == "object":
        return {"description": prop.get("description", ""), "anyOf": [prop, {"type": "null"}]}
    return _blank(prop, {"type": "null"})


def _blank(prop: dict[str, Any], *others: dict[str, Any]) -> dict[str, Any]:
    # An empty form part, or "", is the default: `curl -F size=` and an unset form input.
    extra = {k: prop[k] for k in ("description", "default") if k in prop}
    typed = {k: v for k, v in prop.items() if k not in extra}
    if not typed:  # any value already
        return prop
    return {**extra, "anyOf": [typed, {"type": "string", "maxLength": 0}, *others]}


def edit_bodies(config: GatewayConfig) -> dict[str, Any]:
    """The two request bodies of POST /v1/images/edits."""
    base = json_schema(config)
    props = {k: v for k, v in base["properties"].items() if k != "image"}
    # Ignored whatever it is (SDKs send a string): no type, so none is promised or refused.
    props["prompt"] = {"description": "Accepted for SDK compatibility and ignored."}
    limit = config.limits.max_image_bytes
    image_text = (
        f"An https URL or a data URI (base64, decoded at most {limit} bytes): PNG, JPEG, "
        "WebP, GIF or AVIF."
    )
    json_props = {name: _nullable(prop) for name, prop in props.items()}
    ref = {
        "type": "object",
        "properties": {"image_url": {"type": "string", "minLength": 1}},
        "required": ["image_url"],
    }
    one = {"anyOf": [{"type": "string", "minLength": 1}, ref]}
    json_props["image"] = {
        "description": image_text + " Or OpenAI's object {image_url}.",
        "anyOf": [*one["anyOf"], {"type": "null"}],
    }
    json_props["images"] = {
        "description": "OpenAI's JSON edits shape, instead of 'image': one item.",
        "anyOf": [{"type": "array", "minItems": 1, "maxItems": 1, "items": one}, {"type": "null"}],
    }
    form_props: dict[str, Any] = {}
    for name, prop in props.items():
        if name == "provider":
            form_props[name] = {
                **prop,
                "description": prop["description"]
                + " In a form: a JSON part, or bracket fields (provider[only][]=fal).",
            }
        else:
            form_props[name] = _blank(prop)
    form_props["image"] = {
        "description": f"The image file, at most {limit} bytes: PNG, JPEG, WebP, GIF or AVIF.",
        "type": "string",
        "contentMediaType": "application/octet-stream",
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": form_props, "required": ["image"]},
                "encoding": {
                    "image": {"contentType": "image/png, image/jpeg, image/webp, image/*"},
                    "provider": {"contentType": "application/json"},
                },
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": json_props,
                    # One image, as 'image' or as 'images' (null is absent).
                    "oneOf": [
                        {
                            "required": ["image"],
                            "properties": {"image": one, "images": {"type": "null"}},
                        },
                        {
                            "required": ["images"],
                            "properties": {
                                "images": {"type": "array"},
                                "image": {"type": "null"},
                            },
                        },
                    ],
                },
                "example": {
                    "model": config.model.id,
                    "image": _EXAMPLE_PNG,
                    "scale_factor": 2,
                    "response_format": "b64_json",
                },
            },
        },
    }


def _secure(document: dict[str, Any]) -> None:
    document.setdefault("components", {})["securitySchemes"] = {
        CLIENT_KEY: {
            "type": "http",
            "scheme": "bearer",
            "description": "A client key (GATEWAY_API_KEYS or clients.keys); the OpenAI SDKs "
            "send it as api_key. Not required when the gateway has no keys (development).",
        },
        ADMIN_KEY: {
            "type": "http",
            "scheme": "bearer",
            "description": "GATEWAY_ADMIN_KEY. /status also takes it as the password of HTTP "
            "Basic auth.",
        },
        "metricsKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "GATEWAY_METRICS_KEY, for the Prometheus scrape. Required in "
            "production; /metrics is open in development without it.",
        },
    }
    for path, item in document.get("paths", {}).items():
        for operation in item.values():
            if path == "/v1/files/{file_id}/content":
                # A result image's signed URL is its own credential; an uploaded or batch
                # output file (`file-` ids) takes its owner's key.
                operation["security"] = [{}, {CLIENT_KEY: []}]
                continue
            if path == "/metrics":
                operation["security"] = [{"metricsKey": []}]
            elif path.startswith("/v1/"):
                operation["security"] = [{CLIENT_KEY: []}]
            elif path.startswith(("/admin/", "/status")):
                operation["security"] = [{ADMIN_KEY: []}]


def _operation_ids(document: dict[str, Any]) -> None:
    # A route with two methods (GET and HEAD, PUT and DELETE) is one function: FastAPI names
    # both operations after it, so each gets its method.
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            operation["operationId"] = f"{operation['operationId']}_{method}"


def _provider_names(document: dict[str, Any], names: list[str]) -> None:
    # The admin routes' {name}: the providers this gateway routes to (known once it runs).
    for path, item in document.get("paths", {}).items():
        if "{name}" not in path:
            continue
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "name":
                    parameter["schema"] = {"type": "string", "enum": names}


def build(app: FastAPI, config: GatewayConfig, providers: list[str]) -> dict[str, Any]:
    if app.openapi_schema is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Duplicate Operation ID")  # _operation_ids
            document = _generate(app)
        edits = document["paths"][EDITS_PATH]["post"]
        edits["requestBody"] = edit_bodies(config)
        _secure(document)
        _operation_ids(document)
        _provider_names(document, providers)
        # One route serves PUT and DELETE; only PUT takes the body.
        document["paths"][PRICE_PATH]["delete"].pop("requestBody", None)
        app.openapi_schema = document
    return app.openapi_schema


def _generate(app: FastAPI) -> dict[str, Any]:
    return get_openapi(
        title=app.title,
        version=app.version,
        openapi_version="3.1.0",
        summary=app.summary,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
