"""The YAML configuration: model, limits, providers, routing. Validated once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationError,
    field_validator,
)

from adapters.registry import ADAPTERS
from gateway.provider_inputs import InputRule


class ConfigError(ValueError):
    """The config file cannot be read or is not a valid config: one line, naming the file
    and each wrong place (`routing.breaker.threshold: Extra inputs are not permitted`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    id: str = "recraft-crisp-upscale"
    aliases: tuple[str, ...] = ()
    owned_by: str = "recraft"
    created: int = 1735689600


class Limits(_Strict):
    max_image_bytes: PositiveInt = 10 * 1024 * 1024
    max_pixels: PositiveInt = 4096 * 4096
    min_side: PositiveInt = 32
    max_side: PositiveInt = 4096
    max_scale_factor: float = Field(4.0, ge=1.0, le=16.0)
    max_output_side: PositiveInt = 16384
    max_output_pixels: PositiveInt = 8192 * 8192
    max_n: int = Field(4, ge=1, le=16)
    request_timeout_s: PositiveFloat = 120.0
    body_idle_timeout_s: PositiveFloat = 15.0  # a request body that stalls this long: 408
    body_timeout_s: PositiveFloat = 60.0  # the whole body must have arrived by then: 408
    # Bodies being read at once, by declared size (or the cap, when chunked): past it, 503.
    bodies_in_flight_bytes: PositiveInt = 512 * 1024 * 1024
    # Requests whose bodies are read at once, per process (gateway/intake.py); the rest
    # wait, unread, up to body_idle_timeout_s: then 503.
    bodies_reading: PositiveInt = 32
    write_timeout_s: PositiveFloat = 30.0  # a client that reads none of the answer this long
    # The connection edge (gateway/edge.py): open connections past this get a 503 (and never
    # more than the descriptor limit leaves room for); request line and headers must be in
    # within header_timeout_s and under max_header_bytes.
    max_connections: PositiveInt = 1000
    header_timeout_s: PositiveFloat = 10.0
    max_header_bytes: int = Field(64 * 1024, ge=8 * 1024, le=1024 * 1024)
    image_workers: PositiveInt = 2


class FetchConfig(_Strict):
    timeout_s: PositiveFloat = 15.0
    max_redirects: int = Field(3, ge=0, le=10)
    allow_http: bool = False
    allow_private_networks: bool = False


class OutputConfig(_Strict):
    jpeg_quality: int = Field(90, ge=0, le=100)
    webp_quality: int = Field(90, ge=0, le=100)
    avif_quality: int = Field(70, ge=0, le=100)
    png_compress_level: int = Field(3, ge=0, le=9)


class ResultsConfig(_Strict):
    ttl_s: PositiveInt = 3600  # signed and presigned URLs expire after this, results too
    max_bytes: PositiveInt = 10 << 30  # the oldest results go first past this
    # How a `url` answer reaches the client: presigned (a GET straight from the bucket) or
    # proxy (the gateway streams it). Unset: presigned with GATEWAY_RESULTS_URL; the local
    # directory is always proxied.
    delivery: Literal["presigned", "proxy"] | None = None
    timeout_s: PositiveFloat = 10.0  # each call to the results store


class IdempotencyConfig(_Strict):
    ttl_s: PositiveInt = 86400  # a repeat within this returns the stored response
    # The running claimant renews this lease; a retry takes over a claim whose lease lapsed
    # (its replica died) and follows the provider jobs already submitted.
    lease_s: PositiveFloat = 10.0


class CacheConfig(_Strict):
    """Finished results named by a hash of the input and every output-changing parameter."""

    enabled: bool = True
    ttl_s: PositiveInt = 86400
    max_bytes: PositiveInt = 2 << 30  # cached images on disk; the least recently used go first
    # key: each client key (account) has a cache of its own, so none learns what another
    # uploaded nor gets its results free; shared: one cache for every key of the deployment.
    scope: Literal["key", "shared"] = "key"


class KeyLimits(_Strict):
    """Per client key; None means no limit."""

    usd_per_day: float | None = Field(None, ge=0)
    usd_per_month: float | None = Field(None, ge=0)
    requests_per_minute: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None


class ClientKeyConfig(KeyLimits):
    # The key's SHA-256 in hex (`printf %s "$KEY" | sha256sum`): the config never holds a key.
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ClientsConfig(_Strict):
    # Limits of keys from GATEWAY_API_KEYS, and of every request when no key is configured.
    defaults: KeyLimits = KeyLimits()
    # While Redis is unreachable: refuse (503) requests of keys with a USD budget (true), or
    # admit them on this replica's own view, which cannot see the others' spend (false).
    budgets_fail_closed: bool = True
    # Named keys with limits of their own; the name is their key id in logs and the ledger.
    keys: dict[
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], ClientKeyConfig
    ] = {}


Strategy = Literal["cheapest", "fastest", "balanced", "ordered"]


class BreakerConfig(_Strict):
    failure_threshold: PositiveInt = 3  # consecutive failures that open the circuit ...
    min_error_rate: float = Field(0.5, ge=0, le=1)  # ... if this share of the window failed
    open_base_s: PositiveFloat = 5.0  # first open period; doubles each time it trips again
    open_max_s: PositiveFloat = 300.0


class WeightsConfig(_Strict):
    price: float = Field(1.0, ge=0)
    latency: float = Field(1.0, ge=0)
    errors: float = Field(2.0, ge=0)


class HedgeConfig(_Strict):
    enabled: bool = False
    delay: Literal["p95"] | PositiveFloat = "p95"  # start the next candidate after this
    min_delay_s: float = Field(0.25, ge=0)  # floor under a measured p95
    budget_share: float = Field(0.1, ge=0, le=1)  # hedges per minute <= share x requests
    budget_min_per_minute: int = Field(1, ge=0)


class RoutingConfig(_Strict):
    strategy: Strategy = "cheapest"
    weights: WeightsConfig = WeightsConfig()
    breaker: BreakerConfig = BreakerConfig()
    hedge: HedgeConfig = HedgeConfig()
    explore_share: float = Field(0.05, ge=0, le=1)  # traffic that tries a non-first candidate
    cache_ttl_s: float = Field(1.0, ge=0)  # how long a replica trusts its view of the store
    bucket_s: PositiveFloat = 10.0
    window_s: PositiveFloat = 60.0
    ewma_alpha: float = Field(0.3, gt=0, le=1)
    redis_prefix: str = "upscale"


class InputConfig(_Strict):
    """What a provider takes as input: formats in order of preference, and the size limit
    (the encoded file, before any base64)."""

    formats: tuple[Literal["png", "jpeg", "webp"], ...] = Field(
        ("png", "jpeg", "webp"), min_length=1
    )
    max_bytes: PositiveInt = 9_999_999  # Recraft: under 10 MB (read as decimal, the stricter)

    def rule(self) -> InputRule:
        return InputRule(self.formats, self.max_bytes)


class ProviderConfig(_Strict):
    adapter: str
    enabled: bool = True
    model: str
    price_usd: float = Field(ge=0)
    poll_initial_s: PositiveFloat = 0.1
    poll_max_s: PositiveFloat = 1.0
    # One attempt's share of the request deadline when another candidate is left to try.
    attempt_timeout_s: PositiveFloat = 60.0
    input: InputConfig = InputConfig()
    # Adapter-specific knobs, declared so that a misspelt one is an error, not a silent
    # default. Replicate: inputs up to this size go inline as data URIs, larger via /v1/files.
    data_uri_max_bytes: PositiveInt | None = None
    # Replicate: more https hosts an output may be fetched from with the token.
    delivery_token_hosts: tuple[str, ...] | None = None
    # Read by nothing since Replicate creates stopped waiting (adapters/replicate.py); still
    # accepted because existing configs (the integration tests' among them) set it.
    wait_s: PositiveFloat | None = None

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, value: str) -> str:
        if value not in ADAPTERS:
            raise ValueError(f"unknown adapter {value!r} (known: {', '.join(sorted(ADAPTERS))})")
        return value

    def extras(self) -> dict[str, object]:
        """The adapter knobs that are set, as AdapterSettings.extra takes them."""
        knobs = ("data_uri_max_bytes", "delivery_token_hosts")
        return {k: getattr(self, k) for k in knobs if getattr(self, k) is not None}


class SandboxConfig(_Strict):
    latency_ms: float = Field(1200, ge=0)
    jitter_ms: float = Field(400, ge=0)


class BatchConfig(_Strict):
    """The Batch API (gateway/batch): uploads, and how its lines run on every replica."""

    max_file_bytes: PositiveInt = 200 * 1024 * 1024  # one JSONL input file
    upload_timeout_s: PositiveFloat = 900.0  # the whole upload must have arrived by then
    max_lines: PositiveInt = 50_000  # requests in one input file (OpenAI's limit)
    concurrency: PositiveInt = 8  # lines one replica runs at once
    per_batch: PositiveInt = 16  # lines of one batch in flight over all replicas
    per_key: PositiveInt = 16  # lines of one key's batches in flight over all replicas
    # A line whose worker stopped touching it this long is reclaimed by another (it died);
    # live workers touch theirs every third of it.
    reclaim_idle_s: PositiveFloat = 30.0
    poll_s: PositiveFloat = 1.0  # how often a worker looks for new work when not woken
    window_s: PositiveInt = 86400  # completion_window "24h": past it, the batch expires
    webhook_attempts: PositiveInt = 8  # deliveries of one event (backoff from 1 s, doubling)
    webhook_timeout_s: PositiveFloat = 10.0


class GatewayConfig(_Strict):
    model: ModelConfig = ModelConfig()
    limits: Limits = Limits()
    fetch: FetchConfig = FetchConfig()
    output: OutputConfig = OutputConfig()
    results: ResultsConfig = ResultsConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    cache: CacheConfig = CacheConfig()
    clients: ClientsConfig = ClientsConfig()
    routing: RoutingConfig = RoutingConfig()
    providers: dict[str, ProviderConfig] = {}
    sandbox: SandboxConfig = SandboxConfig()
    batch: BatchConfig = BatchConfig()


def validation_summary(error: ValidationError) -> str:
    """A ValidationError on one line: `place: message; ...`, without the input values (a
    setting's value may be a secret)."""
    parts = []
    for item in error.errors(include_input=False, include_url=False):
        place = ".".join(str(part) for part in item["loc"])
        parts.append(f"{place}: {item['msg']}" if place else item["msg"])
    return "; ".join(parts)


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        # PyYAML's message spans lines (the context, a caret under the column).
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config {path}: not valid YAML{at}: {problem}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections")
    try:
        return GatewayConfig.model_validate(loaded)
    except ValidationError as exc:
        raise ConfigError(f"config {path}: {validation_summary(exc)}") from exc
