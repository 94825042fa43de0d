"""`python -m gateway [--sandbox]`: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import secrets

import uvicorn

from gateway.app import create_app
from gateway.settings import Settings

# In-flight upscales get this long to finish after SIGTERM (compose's stop_grace_period and
# Kubernetes' terminationGracePeriodSeconds must be longer).
DRAIN_S = 30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="route to in-process emulated providers (nothing is billed)",
    )
    parser.add_argument("--host", help="listen address (GATEWAY_HOST)")
    parser.add_argument("--port", type=int, help="listen port (GATEWAY_PORT)")
    parser.add_argument("--config", help="YAML config path (GATEWAY_CONFIG)")
    args = parser.parse_args(argv)
    if args.sandbox:
        os.environ["GATEWAY_SANDBOX"] = "true"
    if args.config:
        os.environ["GATEWAY_CONFIG"] = args.config
    settings = Settings()
    settings.configure_logging()
    options = {
        "host": args.host or settings.host,
        "port": args.port or settings.port,
        "log_level": settings.log_level,
        "access_log": False,  # gateway.access logs one structured line per request
        "proxy_headers": True,
        "timeout_graceful_shutdown": DRAIN_S,
        # Longer than load balancers' idle timeouts (60 s is common), so the balancer, not
        # the gateway, closes an idle connection: no request lands on a socket being closed.
        "timeout_keep_alive": 75,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # Worker processes share one socket; each builds its own app from the environment.
    if not settings.signing_key:
        # A URL signed by one worker must verify in the others.
        os.environ["GATEWAY_SIGNING_KEY"] = secrets.token_urlsafe(32)
    if not settings.redis_url:
        logging.getLogger("gateway").warning(
            "GATEWAY_WORKERS=%d without REDIS_URL: each worker keeps its own routing state "
            "and idempotency keys",
            settings.workers,
        )
    uvicorn.run("gateway.app:create_app", factory=True, workers=settings.workers, **options)


if __name__ == "__main__":
    main()
