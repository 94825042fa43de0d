"""How an emulator behaves: its key, the model's native factor, and its fault script."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from adapters.emulators.faults import FaultScript


class EmulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str | None = None  # the one key accepted; None accepts any non-empty key
    # The key /_emulator/* (fault script, request log, counters, jobs) ask for, as
    # `Authorization: Bearer <key>` or `Key <key>`; None leaves them open, as the tests'
    # own emulators want. The gateway's sandbox sets it: its emulators listen where anyone
    # on the host can reach them.
    admin_key: str | None = Field(None, min_length=1)
    native_factor: float = Field(4.0, gt=0)
    max_output_side: int = Field(4096, gt=0)  # Recraft caps the long side at 4096 px
    output_format: str | None = (
        None  # None: what the real provider returns (fal png, Replicate webp)
    )
    public_url: str | None = None  # base of URLs handed out; None: from the request
    faults: FaultScript = FaultScript()
    max_data_uri_bytes: int | None = None  # Replicate: refuse larger data URIs
    result_ttl_s: float = 3600
    max_jobs: int = 2000  # the oldest finished jobs, and the oldest files, go past this
    # What one succeeded job bills (spoiled outputs included); None: the provider's list
    # price, which config/gateway.yaml's prices equal (fal 0.004, Replicate 0.006).
    price_usd: float | None = Field(None, ge=0)
    # Replicate: its delivery URLs may need the API token (its API reference says so); on,
    # a result file fetched without `Authorization: Bearer <token>` is a 401.
    delivery_requires_token: bool = False
    # Replicate documents its 429 body only (the wait is in the prose, "resets in ~30s"),
    # no Retry-After; on, its rate_limit fault sends one too. fal's always does.
    replicate_retry_after_header: bool = False
