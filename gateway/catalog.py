"""The model ids this gateway answers to: its own, its aliases, and the ids that pin one
provider (the model card's `<provider>/<our id>`, and each provider's own model id)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.config import GatewayConfig, ModelConfig


@dataclass(frozen=True, slots=True)
class ModelCatalog:
    model: ModelConfig
    pinned: Mapping[str, str]  # model id -> the one provider that serves it

    @classmethod
    def of(cls, config: GatewayConfig, providers: Iterable[str]) -> ModelCatalog:
        pinned: dict[str, str] = {}
        for name in providers:
            pinned[f"{name}/{config.model.id}"] = name
            provider = config.providers.get(name)
            if provider is not None:
                pinned[provider.model] = name
        return cls(config.model, pinned)

    @property
    def ids(self) -> frozenset[str]:
        return frozenset((self.model.id, *self.model.aliases, *self.pinned))

    def listed(self) -> list[str]:
        """What GET /v1/models lists: the model, then the pinned ids."""
        return [self.model.id, *sorted(self.pinned)]
