"""The edit service's pure pieces: the model check, the estimate, the x-upscale values and
the ImagesResponse body made of an answer."""

from __future__ import annotations

import base64

import orjson
import pytest

from gateway.cache import CachedResult
from gateway.catalog import ModelCatalog
from gateway.config import ModelConfig
from gateway.errors import InvalidRequest, NotFound
from gateway.params import UpscaleParams
from gateway.routing.entries import Attempt
from gateway.routing.preferences import Preferences
from gateway.routing.spend import Spend
from gateway.service import Edited, images_body, pin_model
from gateway.service.answer import upscale_headers
from gateway.service.estimate import estimate
from gateway.upscale import Upscaled

pytestmark = pytest.mark.anyio
MODEL = ModelConfig().id
CATALOG = ModelCatalog(ModelConfig(), {f"fal/{MODEL}": "fal"})


def _params(model: str = MODEL) -> UpscaleParams:
    return UpscaleParams(model, 2.0, None, "url", "png", None, 1, None, None, None)


def test_pin_model_checks_the_model_and_pins_its_provider() -> None:
    prefs = Preferences(ignore=frozenset({"replicate"}))
    assert pin_model(CATALOG, _params(), prefs) is prefs
    assert pin_model(CATALOG, _params(f"fal/{MODEL}"), prefs).only == frozenset({"fal"})
    with pytest.raises(NotFound) as missing:
        pin_model(CATALOG, _params("dall-e-2"), prefs)
    assert missing.value.param == "model"
    with pytest.raises(InvalidRequest) as excluded:
        pin_model(CATALOG, _params(f"fal/{MODEL}"), Preferences(only=frozenset({"replicate"})))
    assert excluded.value.param == "provider"


def test_estimate_prices_the_lead_and_bounds_the_fallbacks() -> None:
    body = estimate(MODEL, 3, [("fal", 0.004), ("replicate", 0.006)])
    assert body["provider"] == "fal"
    assert body["total_cost_micros"] == 12_000
    assert body["components"][0]["unit_cost_micros"] == 4_000
    assert body["fallbacks"] == ["replicate"]
    assert body["max_cost_micros"] == 18_000


def test_headers_name_each_provider_once_and_every_attempt() -> None:
    attempts = [Attempt("replicate", "ProviderTimeout", 1.0), Attempt("fal", "ok", 2.0, hedge=True)]
    ran = Upscaled(images=[], providers=["fal", "fal"], attempts=attempts, spend=Spend())
    headers = upscale_headers(ran, "miss")
    assert headers == {
        "x-upscale-provider": "fal",
        "x-upscale-cost-usd": "0.000000",
        "x-upscale-attempts": "replicate=ProviderTimeout,fal=ok+hedge",
        "x-upscale-cache": "miss",
    }
    hit = Edited(
        CachedResult(("f1",), "png", "8x8", ("fal",)), upscale_headers(None, "hit", ["fal"])
    )
    assert hit.cost_usd == 0
    assert hit.metadata == {
        "provider": "fal",
        "providers": ["fal"],
        "cost_usd": 0.0,
        "attempts": [],
        "cache": "hit",
    }


async def test_body_signs_stored_files_or_inlines_the_images() -> None:
    stored = CachedResult(("a.png", "b.png"), "png", "64x48", ("fal",))
    headers = {"x-upscale-provider": "fal", "x-upscale-cost-usd": "0.004000"}
    urls = orjson.loads(await images_body(Edited(stored, headers), lambda f: f"https://g/{f}"))
    assert urls["data"] == [{"url": "https://g/a.png"}, {"url": "https://g/b.png"}]
    assert (urls["size"], urls["output_format"]) == ("64x48", "png")
    assert urls["metadata"]["cost_usd"] == 0.004
    inline = orjson.loads(await images_body(Edited(stored, headers, [b"one", b"two"]), str))
    assert [base64.b64decode(d["b64_json"]) for d in inline["data"]] == [b"one", b"two"]
