"""Budgets, rate limits and the spend ledger through the openai SDK: a key over its budget
is refused before any provider is called; requests a minute and requests in flight are
429s with Retry-After; /v1/usage shows a key its own spend and /admin/spend everyone's;
an Idempotency-Key sent twice, or twice at once, is charged once."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import make_image
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
ADMIN = "admin-4d1f8a"
KEYS = {
    "broke": ("sk-broke-0a9f", {"usd_per_day": 0}),
    "tiny": ("sk-tiny-77c1", {"usd_per_day": 0.006}),
    "close": ("sk-close-2d95", {"usd_per_day": 0.008}),
    "monthly": ("sk-monthly-3e2", {"usd_per_month": 0.004}),
    "slow": ("sk-slow-5b20", {"requests_per_minute": 2}),
    "narrow": ("sk-narrow-91d", {"max_concurrent": 1}),
    "team": ("sk-team-c3f0", {}),
    "other": ("sk-other-8e4a", {}),
}


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("budgets")
    keys = {
        name: {"sha256": hashlib.sha256(key.encode()).hexdigest(), **limits}
        for name, (key, limits) in KEYS.items()
    }
    config = write_config(workdir / "g.yaml", clients={"keys": keys})
    process = start_gateway(
        workdir, fal_emulator, replicate_emulator, config, GATEWAY_ADMIN_KEY=ADMIN
    )
    yield process
    process.stop()


def sdk(gateway: GatewayProcess, name: str) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[name][0], max_retries=0, timeout=60)


def edit(client: OpenAI, **extra: Any) -> Any:
    headers = extra.pop("headers", {})
    return client.images.with_raw_response.edit(
        model=MODEL,
        image=("a.png", make_image(40, 40), "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2, "response_format": "b64_json", **extra},
        extra_headers=headers,
    )


def submits(*emulators: Emulator) -> int:
    return sum(
        1 for e in emulators for r in e.requests() if r["path"].endswith(("/crisp", "/predictions"))
    )


def usage(gateway: GatewayProcess, name: str) -> dict[str, Any]:
    response = httpx.get(
        f"{gateway.url}/v1/usage", headers={"Authorization": f"Bearer {KEYS[name][0]}"}
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def test_over_budget_is_429_before_any_provider_is_called(
    limited: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        edit(sdk(limited, "broke"))
    assert err.value.status_code == 429
    assert err.value.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert "daily budget of 0 USD" in err.value.message
    headers = err.value.response.headers
    assert int(headers["retry-after"]) > 0 and headers["x-should-retry"] == "false"
    assert submits(*emulators) == 0
    today = usage(limited, "broke")["today"]
    assert today["spend_usd"] == 0 and today["requests"] == 0


def test_a_budget_counts_what_is_spent_and_what_could_be(
    limited: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    client = sdk(limited, "tiny")
    first = edit(client)
    assert first.headers["x-upscale-cost-usd"] == "0.004000"
    # 0.004 spent + the dearest provider's 0.006 a request could still cost > 0.006
    with pytest.raises(openai.RateLimitError) as err:
        edit(client)
    assert err.value.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert submits(*emulators) == 1
    seen = usage(limited, "tiny")
    assert seen["today"]["spend_usd"] == 0.004 and seen["today"]["requests"] == 1
    assert seen["today"]["by_provider"] == {"fal": {"spend_usd": 0.004, "images": 1}}
    assert seen["limits"]["usd_per_day"] == 0.006
    with pytest.raises(openai.RateLimitError) as err:  # two images could cost 0.012 > 0.004
        edit(sdk(limited, "monthly"), n=2)
    assert "monthly budget of 0.004 USD" in err.value.message


def test_near_its_budget_a_key_is_routed_to_what_it_can_afford(
    limited: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    client = sdk(limited, "close")
    edit(client)  # fal: 0.004 of 0.008 spent
    # Replicate first could cost 0.006 > the 0.004 left; fal alone still fits.
    answer = edit(client, provider={"order": ["replicate", "fal"]})
    assert answer.headers["x-upscale-provider"] == "fal"
    with pytest.raises(openai.RateLimitError):
        edit(client)
    assert usage(limited, "close")["today"]["spend_usd"] == 0.008


def test_requests_per_minute_is_429_with_retry_after(limited: GatewayProcess) -> None:
    client = sdk(limited, "slow")
    edit(client)
    edit(client)
    with pytest.raises(openai.RateLimitError) as err:
        edit(client)
    assert err.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert "2 requests per minute" in err.value.message
    retry_after = int(err.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 30
    assert err.value.response.headers["x-should-retry"] == "true"


def test_requests_in_flight_are_limited(
    limited: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, _ = emulators
    fal.faults(latency_ms=800, jitter_ms=0)
    client = sdk(limited, "narrow")

    def attempt(_: int) -> int:
        try:
            edit(client)
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "concurrency_limit_exceeded"  # type: ignore[index]
            return 429
        return 200

    with ThreadPoolExecutor(3) as pool:
        codes = sorted(pool.map(attempt, range(3)))
    assert codes[0] == 200 and 429 in codes
    assert edit(client).http_response.status_code == 200  # the lease was given back


def test_an_idempotent_retry_is_charged_once(
    limited: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, _ = emulators
    fal.faults(latency_ms=600, jitter_ms=0)
    client = sdk(limited, "team")
    key = str(uuid.uuid4())
    with ThreadPoolExecutor(2) as pool:  # twice at once ...
        list(pool.map(lambda _: edit(client, headers={"Idempotency-Key": key}), range(2)))
    edit(client, headers={"Idempotency-Key": key})  # ... and once more after
    assert submits(*emulators) == 1
    today = usage(limited, "team")["today"]
    assert today["spend_usd"] == 0.004 and today["requests"] == 1


def test_admin_spend_lists_every_key_and_usage_only_ones_own(limited: GatewayProcess) -> None:
    edit(sdk(limited, "other"))
    mine = usage(limited, "other")
    assert mine["key_id"] == "other" and mine["today"]["spend_usd"] == 0.004
    assert mine["month"]["spend_usd"] >= 0.004
    assert httpx.get(f"{limited.url}/admin/spend").status_code == 401
    assert (
        httpx.get(
            f"{limited.url}/admin/spend", headers={"Authorization": f"Bearer {KEYS['team'][0]}"}
        ).status_code
        == 401
    )
    report = httpx.get(
        f"{limited.url}/admin/spend?days=2", headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()
    by_key = {a["key_id"]: a for a in report["accounts"]}
    assert by_key["other"]["spend_usd"] == 0.004
    assert by_key["tiny"]["by_provider"]["fal"]["images"] == 1
    assert report["spend_usd"] == pytest.approx(sum(a["spend_usd"] for a in report["accounts"]))
    bad = httpx.get(
        f"{limited.url}/admin/spend?days=x", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"


def test_one_request_line_per_request_and_never_a_key(limited: GatewayProcess) -> None:
    answer = edit(sdk(limited, "team"))
    rid = answer.headers["x-request-id"]
    lines = [
        json.loads(line.split(" gateway.access ", 1)[1])
        for line in limited.log_path.read_text().splitlines()
        if " gateway.access " in line
    ]
    (line,) = [entry for entry in lines if entry["request_id"] == rid]
    assert line["key_id"] == "team" and line["status"] == 200
    assert line["provider"] == "fal" and line["attempts"] == "fal=ok"
    assert line["cost_usd"] == 0.004 and line["cache"] == "bypass" and line["ms"] > 0
    refused = [e for e in lines if e["key_id"] == "broke" and e["path"] == "/v1/images/edits"]
    assert refused and all(e["status"] == 429 and e["cost_usd"] == 0 for e in refused)
    log = limited.log_path.read_text()
    for secret, _ in KEYS.values():
        assert secret not in log
    assert ADMIN not in log
