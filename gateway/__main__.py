"""`python -m gateway [--sandbox]`: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from gateway.app import create_app
from gateway.settings import Settings


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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=settings.log_level,
        access_log=False,  # gateway.access logs one structured line per request
        proxy_headers=True,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
