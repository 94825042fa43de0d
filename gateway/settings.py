"""Settings from the environment (names are the contract; see DESIGN.md and README)."""

from __future__ import annotations

import logging
import secrets
from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.registry import ADAPTERS
from gateway.config import GatewayConfig, load_config, validation_summary

log = logging.getLogger("gateway.settings")

_PLACEHOLDERS = {"changeme", "change-me", "changethis", "secret", "xxx", "your-key-here"}


def _placeholder(value: str) -> bool:
    """A secret left as shipped: a known placeholder, or one that asks to be changed (the
    compose file's development signing key)."""
    text = value.strip().lower()
    return text in _PLACEHOLDERS or "change-me" in text or "changeme" in text


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    fal_key: str | None = Field(None, alias="FAL_KEY")
    replicate_api_token: str | None = Field(None, alias="REPLICATE_API_TOKEN")
    gateway_fal_url: str = Field("https://queue.fal.run", alias="GATEWAY_FAL_URL")
    gateway_replicate_url: str = Field("https://api.replicate.com", alias="GATEWAY_REPLICATE_URL")
    redis_url: str | None = Field(None, alias="REDIS_URL")
    config_path: str = Field("config/gateway.yaml", alias="GATEWAY_CONFIG")
    api_keys: str | None = Field(None, alias="GATEWAY_API_KEYS")
    admin_key: str | None = Field(None, alias="GATEWAY_ADMIN_KEY")
    host: str = Field("127.0.0.1", alias="GATEWAY_HOST")
    port: int = Field(8080, alias="GATEWAY_PORT")
    public_url: str | None = Field(None, alias="GATEWAY_PUBLIC_URL")
    signing_key: str | None = Field(None, alias="GATEWAY_SIGNING_KEY")
    results_dir: str = Field("var/results", alias="GATEWAY_RESULTS_DIR")
    # s3://bucket/prefix: results, cache blobs and replays in one bucket every replica reads;
    # credentials from the standard AWS_* variables (read by the S3 client itself).
    results_url: str | None = Field(None, alias="GATEWAY_RESULTS_URL")
    aws_endpoint_url: str | None = Field(None, alias="AWS_ENDPOINT_URL")
    aws_region: str | None = Field(None, alias="AWS_REGION")
    # The store's address as clients reach it, for presigned URLs (compose: the gateway
    # uses http://minio:9000, a browser http://localhost:9000); unset: AWS_ENDPOINT_URL.
    results_public_endpoint: str | None = Field(None, alias="GATEWAY_RESULTS_PUBLIC_ENDPOINT")
    environment: Literal["development", "production"] = Field("development", alias="GATEWAY_ENV")
    sandbox: bool = Field(False, alias="GATEWAY_SANDBOX")
    log_level: str = Field("info", alias="GATEWAY_LOG_LEVEL")
    workers: int = Field(1, ge=1, le=64, alias="GATEWAY_WORKERS")
    metrics_key: str | None = Field(None, alias="GATEWAY_METRICS_KEY")
    # Batch events (batch.completed, ...) are POSTed here, signed with the whsec_ secret.
    webhook_url: str | None = Field(None, alias="GATEWAY_WEBHOOK_URL")
    webhook_secret: str | None = Field(None, alias="GATEWAY_WEBHOOK_SECRET")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        # It is printed (startup log, landing page) and handed out in every result URL: a
        # password in it would be everyone's.
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("GATEWAY_PUBLIC_URL must be an http(s) URL")
        if parts.username or parts.password:
            raise ValueError("GATEWAY_PUBLIC_URL must not carry a user name or password")
        return value

    @field_validator("results_url")
    @classmethod
    def _results_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("GATEWAY_RESULTS_URL must look like s3://bucket/prefix")
        return value

    @field_validator("aws_endpoint_url", "results_public_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        # The public endpoint is handed out in every presigned URL: no password in it.
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL")
        if parts.username or parts.password:
            raise ValueError("must not carry a user name or password")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _webhooks(self) -> Settings:
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("GATEWAY_WEBHOOK_URL needs GATEWAY_WEBHOOK_SECRET (whsec_...)")
        if self.webhook_secret:
            from gateway.batch.webhooks import secret_key

            secret_key(self.webhook_secret)  # raises ValueError with what is wrong
        return self

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.environment == "development":
            return self
        secrets_ = ("fal_key", "replicate_api_token", "signing_key", "api_keys", "admin_key")
        for name in (*secrets_, "metrics_key"):
            value = getattr(self, name)
            if value and _placeholder(value):
                env = type(self).model_fields[name].alias
                raise ValueError(f"{env} holds a placeholder value outside development")
        return self

    def production_refusals(self, config: GatewayConfig) -> list[str]:
        """What keeps this deployment from starting in production, one phrase each (empty
        in development). Production never falls back to sandbox mode: without a provider
        credential it does not start, rather than serve emulated images to paying clients."""
        if self.environment != "production":
            return []
        refusals, missing = [], []
        if self.sandbox:
            refusals.append("sandbox mode (--sandbox, GATEWAY_SANDBOX) is development only")
        enabled = [p for p in config.providers.values() if p.enabled]
        wanted = sorted({ADAPTERS[p.adapter].key_env for p in enabled})
        if not enabled:
            refusals.append(f"no provider is enabled in {self.config_path}")
        elif not any(self.env_value(name) for name in wanted):
            missing.append(f"{' or '.join(wanted)} (a credential of an enabled provider)")
        if not (self.client_keys() or config.clients.keys):
            missing.append(f"GATEWAY_API_KEYS (or clients.keys in {self.config_path})")
        for name in ("GATEWAY_SIGNING_KEY", "GATEWAY_PUBLIC_URL", "GATEWAY_METRICS_KEY"):
            if not (self.env_value(name) or "").strip():
                missing.append(name)
        return refusals + (["missing " + ", ".join(missing)] if missing else [])

    def env_value(self, env_name: str) -> str | None:
        """A setting by its environment name (adapters are registered with theirs)."""
        for field_name, info in type(self).model_fields.items():
            if info.alias == env_name:
                value = getattr(self, field_name)
                return value or None
        raise KeyError(env_name)

    def configure_logging(self) -> None:
        """Root logging as the gateway writes it; a no-op once configured, so the CLI and each
        worker process (which builds its app from the environment) can both call it."""
        logging.basicConfig(
            level=self.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        if self.log_level.lower() != "debug":
            # httpx logs each provider call at INFO; the gateway's own attempt lines already
            # say what happened, once per attempt, without the job URLs.
            logging.getLogger("httpx").setLevel(logging.WARNING)
            # pyvips relays libvips' progress chatter (a dozen lines per image) at INFO.
            logging.getLogger("pyvips").setLevel(logging.WARNING)

    def client_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in (self.api_keys or "").split(",") if k.strip())

    def signing_secret(self) -> bytes:
        if self.signing_key:
            return self.signing_key.encode()
        # Development only (the validator refuses this elsewhere): URLs signed by one process
        # do not verify in another, so several replicas need GATEWAY_SIGNING_KEY.
        log.warning("GATEWAY_SIGNING_KEY unset: using a per-process key (one replica only)")
        return secrets.token_bytes(32)

    def load_config(self) -> GatewayConfig:
        return load_config(self.config_path)


def settings_error(error: ValidationError) -> str:
    """Invalid settings on one line, by environment name, without their values."""
    return f"invalid settings: {validation_summary(error)}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
