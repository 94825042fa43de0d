"""Several gateway processes on one Redis key space: the replicas behind a load balancer."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.servers import GatewayProcess

_prefix = itertools.count()


class Gateways:
    """Gateway processes for one test, all on one Redis key space of their own."""

    def __init__(self, workdir: Path, fal: Emulator, replicate: Emulator, redis_url: str):
        self.workdir, self.fal, self.replicate, self.redis_url = workdir, fal, replicate, redis_url
        self.prefix = f"scenario{next(_prefix)}"
        self.running: list[GatewayProcess] = []

    def start(
        self,
        count: int = 1,
        providers: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        sections: dict[str, Any] | None = None,
        **routing: Any,
    ) -> list[GatewayProcess]:
        config = write_config(
            self.workdir / f"{self.prefix}.yaml",
            **(sections or {}),
            providers=providers or {},
            routing={
                "redis_prefix": self.prefix,
                "explore_share": 0,
                "cache_ttl_s": 1.0,
                "breaker": {"failure_threshold": 3, "open_base_s": 2, "open_max_s": 30},
                **routing,
            },
        )
        started = [
            start_gateway(
                self.workdir,
                self.fal,
                self.replicate,
                config,
                REDIS_URL=self.redis_url,
                **(env or {}),
            )
            for _ in range(count)
        ]
        self.running += started
        return started

    def stop(self) -> None:
        for process in self.running:
            process.stop()
