"""How an emulator behaves: its key, the model's native factor, and its fault script."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from adapters.emulators.faults import FaultScript


class EmulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str | None = None  # the one key accepted; None accepts any non-empty key
    native_factor: float = Field(4.0, gt=0)
    max_output_side: int = Field(4096, gt=0)  # Recraft caps the long side at 4096 px
    output_format: str | None = (
        None  # None: what the real provider returns (fal png, Replicate webp)
    )
    public_url: str | None = None  # base of URLs handed out; None: from the request
    faults: FaultScript = FaultScript()
    max_data_uri_bytes: int | None = None  # Replicate: refuse larger data URIs
    result_ttl_s: float = 3600
    max_jobs: int = 2000  # oldest jobs and files are evicted past this
    # What one succeeded job bills (spoiled outputs included); None: the provider's list
    # price, which config/gateway.yaml's prices equal (fal 0.004, Replicate 0.006).
    price_usd: float | None = Field(None, ge=0)
