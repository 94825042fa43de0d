"""Failover (first version): cheapest first, the next provider on a retryable fault, inside
one deadline; the caller's own mistakes never fail over. Faults come from the emulators'
fault scripts, set at run time through their admin routes."""

from __future__ import annotations

import random

import openai
import pytest
from openai import OpenAI

from reliability.drills import unique_png
from tests.conftest import make_image
from tests.integration.conftest import FAL_KEY, REPLICATE_TOKEN, Emulator, own_gateway

MODEL = "recraft-crisp-upscale"


def raw_edit(client: OpenAI, **extra: object):  # type: ignore[no-untyped-def]
    return client.images.with_raw_response.edit(
        model=MODEL,
        image=("in.png", make_image(40, 40), "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2, **extra},
    )


def test_fal_flags_reach_fal_as_sent(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    fal, replicate = emulators
    raw = raw_edit(client, sync_mode=True, enable_safety_checker=False)
    assert raw.headers["x-upscale-provider"] == "fal"
    (submitted,) = fal.requests()
    assert submitted["input"]["sync_mode"] is True
    assert submitted["input"]["enable_safety_checker"] is False
    assert not replicate.requests()
    assert FAL_KEY not in str(submitted)


# (fault script, the fal attempt's outcome, what fal billed): a job whose output a fault
# spoiled (an unreadable submit answer, a truncated file, no image) ran and is paid for.
@pytest.mark.parametrize(
    ("faults", "outcome", "fal_billed"),
    [
        ({"error_rate": 1, "error_status": 500}, "ProviderUnavailable", 0),
        ({"error_rate": 1, "error_status": 503}, "ProviderUnavailable", 0),
        ({"rate_limit_rate": 1, "retry_after_s": 0.01}, "ProviderRateLimited", 0),
        ({"malformed_rate": 1}, "ProviderBadResponse", 0.004),
        ({"truncated_rate": 1}, "ProviderBadResponse", 0.004),
        ({"job_failure_rate": 1}, None, 0),
        ({"empty_output_rate": 1}, "ProviderBadResponse", 0.004),
        ({"hang_rate": 1, "hang_s": 30}, "ProviderTimeout", 0),
    ],
)
def test_retryable_fal_fault_fails_over_to_replicate(
    client: OpenAI,
    emulators: tuple[Emulator, Emulator],
    faults: dict[str, object],
    outcome: str | None,
    fal_billed: float,
) -> None:
    fal, replicate = emulators
    fal.faults(**faults)
    raw = raw_edit(client, sync_mode=True, enable_safety_checker=False)
    result = raw.parse()
    assert raw.headers["x-upscale-provider"] == "replicate"
    assert raw.headers["x-upscale-cost-usd"] == f"{0.006 + fal_billed:.6f}"
    first, second = raw.headers["x-upscale-attempts"].split(",")
    assert first.startswith("fal=") and second == "replicate=ok"
    if outcome:
        assert first == f"fal={outcome}"
    assert result.size == "80x80"
    (created,) = replicate.requests()
    assert set(created["input"]) == {"image"}  # fal-only flags never reach Replicate
    assert REPLICATE_TOKEN not in str(created)


def test_both_down_is_503_saying_why(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    fal, replicate = emulators
    fal.faults(error_rate=1, error_status=500)
    replicate.faults(error_rate=1, error_status=402)
    with pytest.raises(openai.InternalServerError) as err:
        raw_edit(client)
    assert err.value.status_code == 503
    message = str(err.value.message)
    assert "fal:" in message and "replicate:" in message and "402" in message
    assert err.value.response.headers["x-upscale-attempts"] == (
        "fal=ProviderUnavailable,replicate=ProviderUnavailable"
    )


def test_content_policy_refusal_does_not_fail_over(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, replicate = emulators
    fal.faults(content_policy_rate=1)
    with pytest.raises(openai.BadRequestError) as err:
        raw_edit(client)
    assert err.value.code == "content_policy_violation" and err.value.param == "image"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert not replicate.requests()


def test_safety_checker_keeps_to_fal(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    fal, replicate = emulators
    fal.faults(error_rate=1, error_status=500)
    with pytest.raises(openai.InternalServerError) as err:
        raw_edit(client, enable_safety_checker=True)
    assert err.value.status_code == 503
    assert "enable_safety_checker=true" in str(err.value.message)
    assert not replicate.requests()


def test_replicate_large_input_uses_files_api(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, replicate = emulators
    fal.faults(error_rate=1, error_status=500)
    noisy = make_image(700, 700, fmt="PNG", compress_level=0)  # > 256 KB
    assert len(noisy) > 256 * 1024
    raw = client.images.with_raw_response.edit(
        model=MODEL,
        image=("in.png", noisy, "image/png"),
        prompt="x",
        extra_body={"scale_factor": 1, "response_format": "b64_json"},
    )
    assert raw.headers["x-upscale-provider"] == "replicate"
    upload, created = replicate.requests()
    assert upload["path"] == "/v1/files" and upload["input"]["bytes"] == len(noisy)
    assert created["input"]["image"] == {"kind": "url", "url": created["input"]["image"]["url"]}
    assert "/v1/files/" in created["input"]["image"]["url"]


def test_unreachable_providers_are_503_for_every_image(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Both providers refuse connections; with n=2 each image's routing fails on its own and
    the caller still gets one 503 (not a 500 from a group of failures)."""
    closed = Emulator.unreachable()
    with own_gateway(tmp_path_factory, closed, closed) as gateway:
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="any", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as err:
            raw_edit(client, n=2)
        assert err.value.status_code == 503
        assert err.value.response.headers["x-upscale-attempts"].count("ProviderUnavailable") >= 2
        assert "Traceback" not in gateway.log()


def test_a_trickled_result_cannot_outlive_the_attempts_deadline(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    """Each socket read gets its bytes in time, the attempt as a whole does not: fal's result
    trickles at 10 KB/s (over a minute for this one) and fal's attempt has 3 s, then the
    request fails over."""
    fal, _ = emulators
    fal.faults(slow_download_rate=1, download_bytes_per_s=1)
    noisy = unique_png(random.Random(7), side=128)  # about 0.8 MB of output: no compression
    slow = client.with_options(timeout=25)  # the old per-read bound ran past this
    raw = slow.images.with_raw_response.edit(
        model=MODEL, image=("in.png", noisy, "image/png"), prompt="x"
    )
    assert raw.headers["x-upscale-attempts"] == "fal=ProviderTimeout,replicate=ok"
    # fal's job ran to its end before its output was given up on: it is billed.
    assert raw.headers["x-upscale-cost-usd"] == "0.010000"


def test_an_image_that_fails_still_leaves_its_paid_sibling_in_the_bill(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    """n=2: fal serves one image at once and refuses the other's submit; that one fails
    over to Replicate, whose job fails a second later. The request fails, and the image
    fal already made (and billed) is in the bill and the ledger (the reconciliation after
    every test checks the ledger against the emulators' bills)."""
    fal, replicate = emulators
    # Seed 10 draws 0.57 then 0.43: the first submit passes, the second gets the 500.
    fal.faults(error_rate=0.5, error_status=500, seed=10, latency_ms=30, jitter_ms=0)
    replicate.faults(job_failure_rate=1, latency_ms=1000, jitter_ms=0)
    with pytest.raises(openai.APIStatusError) as failed:
        client.images.edit(
            model=MODEL, image=("in.png", make_image(40, 40), "image/png"), prompt="x", n=2
        )
    assert failed.value.status_code >= 500
    headers = failed.value.response.headers
    assert headers["x-upscale-cost-usd"] == "0.004000", headers
    assert sorted(headers["x-upscale-attempts"].split(",")) == [
        "fal=ProviderUnavailable",
        "fal=ok",
        "replicate=ProviderBadResponse",
    ]
