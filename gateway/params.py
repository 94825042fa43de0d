"""The request's parameters: one table drives validation, coercion of form strings, and the
JSON Schema published by /v1/models/{id}?schema=true."""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.config import GatewayConfig
from gateway.errors import InvalidRequest

OUTPUT_FORMATS = ("png", "jpeg", "gif", "webp", "avif")
_FORMAT_ALIASES = {"jpg": "jpeg"}
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_MAX_WHOLE = 2**53
# No parameter nests more than a few levels (provider[only][] is 3); a body may nest a field
# hundreds deep (bracket names, an ignored JSON field), which recursive code would choke on.
MAX_FIELD_DEPTH = 32
_ORJSON_DEPTH = 254  # the containers orjson encodes nested before it refuses


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    type: Literal["string", "integer", "number", "boolean"]
    description: str
    default: Any = None
    enum: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    pattern: str | None = None


def param_table(config: GatewayConfig) -> tuple[Spec, ...]:
    lim = config.limits
    return (
        Spec("model", "string", "Model id.", config.model.id),
        Spec("prompt", "string", "Accepted for SDK compatibility and ignored."),
        Spec(
            "scale_factor",
            "number",
            "Upscale factor; the output is exactly "
            "round(w*s) x round(h*s). Absent (and no size): the model's native output.",
            minimum=1,
            maximum=lim.max_scale_factor,
        ),
        Spec(
            "size",
            "string",
            "WxH box to fit the upscaled image into, used when "
            "scale_factor is absent; 'auto' means the model's native output.",
            pattern=r"^(auto|\d+x\d+)$",
        ),
        Spec("response_format", "string", "How images are returned.", "url", ("url", "b64_json")),
        Spec("output_format", "string", "Encoding of the returned image.", "png", OUTPUT_FORMATS),
        Spec(
            "output_compression",
            "integer",
            "Quality for jpeg, webp and avif (100 = best, "
            "OpenAI's convention); zlib effort for png.",
            minimum=0,
            maximum=100,
        ),
        Spec(
            "n",
            "integer",
            "Number of upscales of the image (each is billed).",
            1,
            minimum=1,
            maximum=lim.max_n,
        ),
        Spec(
            "enable_safety_checker",
            "boolean",
            "Ask for the provider's safety checker "
            "(fal only: true restricts routing to providers that have one).",
        ),
        Spec("sync_mode", "boolean", "fal's sync_mode, passed through to fal."),
        Spec("user", "string", "End-user id for abuse monitoring.", max_length=256),
        Spec(
            "cache",
            "boolean",
            "false: skip the result cache (and coalescing with identical requests in flight); "
            "the provider is called and billed again.",
        ),
    )


def json_schema(config: GatewayConfig) -> dict[str, Any]:
    keys = ("default", "enum", "minimum", "maximum", "pattern")
    props: dict[str, Any] = {}
    for spec in param_table(config):
        prop: dict[str, Any] = {"type": spec.type, "description": spec.description}
        prop.update({k: getattr(spec, k) for k in keys if getattr(spec, k) is not None})
        if spec.max_length is not None:
            prop["maxLength"] = spec.max_length
        if "enum" in prop:
            prop["enum"] = list(prop["enum"])
        props[spec.name] = prop
    props["image"] = {
        "description": "The image: a file part (multipart), or an https URL or data URI (JSON).",
        "type": "string",
        "contentMediaType": "image/png, image/jpeg, image/webp, image/gif, image/avif",
        "maxBytes": config.limits.max_image_bytes,
    }
    names = {"type": "array", "items": {"type": "string", "enum": sorted(config.providers)}}
    props["provider"] = {
        "type": "object",
        "description": "Routing preferences, shaped like OpenRouter's provider object.",
        "additionalProperties": False,
        "properties": {
            "order": {**names, "description": "Try these first, in this order."},
            "only": {**names, "description": "Use only these providers."},
            "ignore": {**names, "description": "Never use these providers."},
            "sort": {
                "type": "string",
                "enum": ["price", "latency", "cheapest", "fastest", "balanced", "ordered"],
            },
            "max_price": {"type": "number", "minimum": 0, "description": "USD per image."},
            "allow_fallbacks": {"type": "boolean", "default": True},
            "hedge": {"type": "boolean", "description": "Hedge against a slow provider."},
        },
    }
    return {"type": "object", "properties": props, "required": ["image"]}


def _coerce(spec: Spec, value: Any, text: bool) -> Any:
    """`text`: the value came as form text, where "2" and "true" are how numbers and
    booleans are written; in JSON they must be JSON's own (as the OpenAPI document says)."""

    def bad() -> InvalidRequest:  # only when refused: the message reprs the value
        return InvalidRequest(_expected(spec, value), param=spec.name)

    if not text and spec.type != "string" and isinstance(value, str):
        raise bad()
    if spec.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if spec.type in ("integer", "number"):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = float(value.strip()) if spec.type == "number" else int(value.strip())
            except ValueError:
                raise bad() from None
        if not isinstance(value, int | float):
            raise bad()
        # Whole numbers past 2**53 are no one's parameter (and overflow a float, in
        # isfinite and in the message below): refused like any other bad value.
        if (isinstance(value, int) and abs(value) > _MAX_WHOLE) or not math.isfinite(value):
            raise bad()
        if spec.type == "integer" and value != int(value):
            raise bad()
        value = int(value) if spec.type == "integer" else float(value)
        if (spec.minimum is not None and value < spec.minimum) or (
            spec.maximum is not None and value > spec.maximum
        ):
            raise InvalidRequest(
                f"'{spec.name}' must be between {spec.minimum:g} and {spec.maximum:g}; "
                f"got {value:g}.",
                param=spec.name,
            )
        return value
    if not isinstance(value, str):
        raise bad()
    if spec.max_length is not None and len(value) > spec.max_length:
        raise InvalidRequest(
            f"'{spec.name}' is longer than {spec.max_length} characters.", param=spec.name
        )
    if spec.enum is not None:
        value = _FORMAT_ALIASES.get(value.strip().lower(), value.strip().lower())
        if value not in spec.enum:
            raise bad()
    return value


def _expected(spec: Spec, value: Any) -> str:
    shown = reprlib.repr(value)[:60]  # bounded work for a value of megabytes
    if spec.enum is not None:
        options = ", ".join(f"'{e}'" for e in spec.enum)
        return f"Invalid value for '{spec.name}': {shown}. Supported values are: {options}."
    return f"Invalid type for '{spec.name}': expected {spec.type}, got {shown}."


@dataclass(frozen=True, slots=True)
class UpscaleParams:
    model: str
    scale_factor: float | None
    size: tuple[int, int] | None
    response_format: str
    output_format: str
    output_compression: int | None
    n: int
    enable_safety_checker: bool | None
    sync_mode: bool | None
    user: str | None
    cache: bool | None = None
    # "low" for batch lines: providers with a queue priority (fal) run them after live work.
    priority: str = "normal"

    def provider_options(self) -> dict[str, object]:
        return {"enable_safety_checker": self.enable_safety_checker, "sync_mode": self.sync_mode}

    def required_flags(self) -> frozenset[str]:
        """Flags only some providers can honour; routing keeps to providers that support them."""
        return frozenset({"enable_safety_checker"}) if self.enable_safety_checker else frozenset()


def nested_within(value: Any, levels: int) -> bool:
    """Whether `value` nests at most `levels` containers deep, measured by orjson in C: a
    walk in Python would cost seconds on a body of millions of elements. Wrapped in enough
    lists to leave it `levels` of orjson's own limit, it encodes exactly when it fits."""
    wrapped = value
    for _ in range(_ORJSON_DEPTH - levels):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped, default=str)
    except orjson.JSONEncodeError as exc:
        return "recursion" not in str(exc).lower()  # only the depth is judged here
    return True


def check_depth(fields: Mapping[str, Any]) -> None:
    """Refuse a body nested deeper than any parameter, before anything walks its fields."""
    if nested_within(dict(fields), MAX_FIELD_DEPTH):
        return
    name = next((k for k, v in fields.items() if not nested_within(v, MAX_FIELD_DEPTH - 1)), None)
    raise InvalidRequest(
        f"The body nests more than {MAX_FIELD_DEPTH} levels deep (in the field "
        f"{str(name)[:60]!r}); no parameter nests so deep.",
        param=None if name is None else str(name)[:60],
    )


def parse_params(
    fields: Mapping[str, Any], config: GatewayConfig, *, text: bool = True
) -> UpscaleParams:
    check_depth(fields)
    values: dict[str, Any] = {}
    for spec in param_table(config):
        raw = fields.get(spec.name)
        if spec.name == "prompt" or raw is None or raw == "":
            values[spec.name] = spec.default
            continue
        values[spec.name] = _coerce(spec, raw, text)
    return UpscaleParams(
        model=values["model"],
        scale_factor=values["scale_factor"],
        size=_parse_size(values["size"], config),
        response_format=values["response_format"],
        output_format=values["output_format"],
        output_compression=values["output_compression"],
        n=values["n"],
        enable_safety_checker=values["enable_safety_checker"],
        sync_mode=values["sync_mode"],
        user=values["user"],
        cache=values["cache"],
    )


def _parse_size(value: str | None, config: GatewayConfig) -> tuple[int, int] | None:
    if value is None or value.strip().lower() == "auto":
        return None
    match = _SIZE.match(value)
    if not match:
        raise InvalidRequest(
            f"Invalid value for 'size': {value[:40]!r}. Use 'WIDTHxHEIGHT' or 'auto'.",
            param="size",
        )
    w, h = int(match[1]), int(match[2])
    if not (1 <= w <= config.limits.max_output_side and 1 <= h <= config.limits.max_output_side):
        raise InvalidRequest(
            f"'size' sides must be between 1 and {config.limits.max_output_side}.", param="size"
        )
    return w, h


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, unlike round()'s banker's rounding


def target_size(
    params: UpscaleParams, width: int, height: int, config: GatewayConfig
) -> tuple[int, int] | None:
    """The exact output size, or None for the provider's native output."""
    lim = config.limits
    if params.scale_factor is not None:
        factor, param = params.scale_factor, "scale_factor"
    elif params.size is not None:
        box_w, box_h = params.size
        factor, param = min(box_w / width, box_h / height), "size"
        if factor < 1:
            raise InvalidRequest(
                f"'size' {box_w}x{box_h} is smaller than the {width}x{height} input; this model "
                "only upscales.",
                param="size",
            )
        if factor > lim.max_scale_factor:
            raise InvalidRequest(
                f"'size' {box_w}x{box_h} needs a factor of {factor:.2f} for the {width}x{height} "
                f"input; the maximum is {lim.max_scale_factor:g}.",
                param="size",
            )
    else:
        return None
    out = (_round(width * factor), _round(height * factor))
    if max(out) > lim.max_output_side or out[0] * out[1] > lim.max_output_pixels:
        raise InvalidRequest(
            f"The output would be {out[0]}x{out[1]}, over the gateway's limit "
            f"({lim.max_output_side} px a side, {lim.max_output_pixels} pixels).",
            param=param,
        )
    return out
