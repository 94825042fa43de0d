"""The response shapes, for the OpenAPI document only.

Handlers build their bodies with orjson (no pydantic on the request path); these models
describe those bodies, and the schema-driven tests (tests/api) hold each handler to its
model on every answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    # Answers may grow fields; clients must ignore unknown ones, as with OpenAI's.
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(examples=["invalid_request_error"])
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error, whatever its status: OpenAI's envelope."""

    error: ErrorDetail


class ImageDatum(_Open):
    url: str | None = Field(None, description="Signed and expiring (response_format=url).")
    b64_json: str | None = Field(None, description="The image (response_format=b64_json).")


class ImagesMetadata(_Open):
    provider: str | None = Field(description="The provider that made the first image.")
    providers: list[str]
    cost_usd: float = Field(description="What this request was billed (0 for a cache hit).")
    attempts: list[str] = Field(description="Each provider attempt: provider:outcome:ms.")
    cache: str = Field(description="hit, coalesced, miss or bypass.")


class ImagesResponse(_Open):
    created: int
    data: list[ImageDatum]
    output_format: Literal["png", "jpeg", "gif", "webp", "avif"]
    size: str = Field(examples=["2048x2048"])
    metadata: ImagesMetadata


class CostComponent(_Open):
    type: Literal["image"]
    provider: str
    quantity: int
    unit_cost_micros: int
    cost_micros: int


class Estimate(_Open):
    """The answer to ?dryRun=true: nothing was called or spent."""

    estimated: Literal[True]
    model: str
    provider: str = Field(description="The provider routing would try first.")
    total_cost_micros: int = Field(description="Micro-USD, if the first provider serves.")
    currency: Literal["USD"]
    components: list[CostComponent]
    fallbacks: list[str]
    max_cost_micros: int = Field(description="Micro-USD at most, if fallbacks serve.")


class Model(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parameters: dict[str, Any] | None = Field(
        None, description="The request body's JSON Schema (with ?schema=true)."
    )


class ModelList(_Open):
    object: Literal["list"]
    data: list[Model]


class DayRow(_Open):
    spend_usd: float
    requests: int
    failed: int
    cache_hits: int
    by_provider: dict[str, dict[str, Any]]


class DatedRow(DayRow):
    date: str


class MonthSpend(_Open):
    month: str
    spend_usd: float


class Usage(_Open):
    object: Literal["usage"]
    key_id: str
    limits: dict[str, Any]
    today: DatedRow
    month: MonthSpend
    days: list[DatedRow]
    simulated: bool = Field(description="True in sandbox mode: emulated providers, no bill.")


class AccountSpend(DayRow):
    key_id: str
    days: list[DatedRow]


class Spend(DayRow):
    object: Literal["spend"]
    days: int  # type: ignore[assignment]
    accounts: list[AccountSpend]
    unsettled_bills: int
    simulated: bool


class ProviderState(_Open):
    provider: str
    state: str
    circuit: Literal["closed", "open", "half_open"]
    drained: bool
    error_rate: float
    price_usd: float
    config_price_usd: float


class ProviderStates(_Open):
    object: Literal["list"]
    data: list[ProviderState]


class Drained(BaseModel):
    provider: str
    drained: bool


class Priced(BaseModel):
    provider: str
    price_usd: float | None
    from_config: bool


class PriceChange(BaseModel):
    price_usd: float = Field(ge=0, lt=100, description="USD per image, for every replica.")


class BreakerReset(BaseModel):
    provider: str
    circuit: Literal["closed"]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(_Open):
    status: Literal["ready", "degraded", "unavailable"]
    sandbox: bool
    mode: str
    providers: list[dict[str, Any]]
    state_store: dict[str, Any]


class SpendToday(DatedRow):
    simulated: bool


class StatusFigures(_Open):
    generated_at: int
    sandbox: bool
    simulated: bool = Field(description="True in sandbox mode: emulated providers, no bill.")
    state_store: dict[str, Any]
    providers: list[ProviderState]
    last_hour: dict[str, int]
    cache: dict[str, Any]
    spend_today: SpendToday
    batches: dict[str, Any] | None = Field(
        None,
        description="Batches still running on every replica: `running`, `lines_done`, "
        "`lines_total`, `spend_usd`, the first 50 `batches`, and `lines_running_here` "
        "(this replica's); `unavailable` when the records cannot be read.",
    )
