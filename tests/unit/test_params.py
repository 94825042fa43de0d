from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from gateway.errors import InvalidRequest
from gateway.params import json_schema, parse_params, target_size

CONFIG = GatewayConfig()


def test_defaults() -> None:
    p = parse_params({}, CONFIG)
    assert (p.model, p.n, p.response_format, p.output_format) == (
        "recraft-crisp-upscale",
        1,
        "url",
        "png",
    )
    assert p.scale_factor is None and p.size is None and p.enable_safety_checker is None


def test_form_strings_are_coerced() -> None:
    p = parse_params(
        {
            "scale_factor": "2.5",
            "n": "3",
            "enable_safety_checker": "true",
            "sync_mode": "0",
            "output_format": "JPG",
            "output_compression": "40",
        },
        CONFIG,
    )
    assert p.scale_factor == 2.5 and p.n == 3 and p.enable_safety_checker is True
    assert p.sync_mode is False and p.output_format == "jpeg" and p.output_compression == 40


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scale_factor", "0.5"),
        ("scale_factor", "5"),
        ("scale_factor", "nan"),
        ("scale_factor", "two"),
        ("scale_factor", True),
        ("n", "0"),
        ("n", "5"),
        ("n", "1.5"),
        ("response_format", "file"),
        ("output_format", "bmp"),
        ("output_compression", "101"),
        ("output_compression", "-1"),
        ("enable_safety_checker", "maybe"),
        ("size", "big"),
        ("size", "0x100"),
        ("user", "u" * 300),
        ("model", 12),
    ],
)
def test_bad_values_name_their_param(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_params({field: value}, CONFIG)
    assert err.value.param == field


def test_prompt_is_never_an_error() -> None:
    assert parse_params({"prompt": {"any": ["thing"]}}, CONFIG).model == "recraft-crisp-upscale"


def test_target_from_scale_factor_rounds_half_up() -> None:
    p = parse_params({"scale_factor": "1.5"}, CONFIG)
    assert target_size(p, 33, 47, CONFIG) == (50, 71)  # 49.5 -> 50, 70.5 -> 71


def test_target_from_size_fits_the_box() -> None:
    p = parse_params({"size": "1024x1024"}, CONFIG)
    assert target_size(p, 512, 256, CONFIG) == (1024, 512)
    assert target_size(parse_params({"size": "auto"}, CONFIG), 512, 256, CONFIG) is None


def test_scale_factor_wins_over_size() -> None:
    p = parse_params({"size": "1024x1024", "scale_factor": 3}, CONFIG)
    assert target_size(p, 100, 100, CONFIG) == (300, 300)


@pytest.mark.parametrize("size", ["100x100", "8192x8192"])
def test_size_box_out_of_range(size: str) -> None:
    p = parse_params({"size": size}, CONFIG)
    with pytest.raises(InvalidRequest) as err:
        target_size(p, 512, 512, CONFIG)
    assert err.value.param == "size"


def test_output_bound() -> None:
    p = parse_params({"scale_factor": 4}, CONFIG)
    with pytest.raises(InvalidRequest) as err:
        target_size(p, 4096, 4096, CONFIG)
    assert err.value.param == "scale_factor"


def test_schema_lists_bounds_enums_and_required() -> None:
    schema = json_schema(CONFIG)
    props = schema["properties"]
    assert schema["required"] == ["image"]
    assert props["scale_factor"]["minimum"] == 1 and props["scale_factor"]["maximum"] == 4
    assert props["output_format"]["enum"] == ["png", "jpeg", "gif", "webp", "avif"]
    assert props["response_format"]["default"] == "url"
    assert props["n"] == {**props["n"], "type": "integer", "minimum": 1, "maximum": 4}
