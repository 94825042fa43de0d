"""`python -m adapters.emulators fal|replicate --port N`: one emulator, standalone."""

from __future__ import annotations

import argparse

import uvicorn

from adapters.emulators import EmulatorConfig, FaultScript, create_fal_app, create_replicate_app
from adapters.emulators.server import KEEP_ALIVE_S


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m adapters.emulators")
    parser.add_argument("provider", choices=("fal", "replicate"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--key", help="the one key to accept (default: any)")
    parser.add_argument("--admin-key", help="the key /_emulator/* ask for (default: none)")
    parser.add_argument("--native-factor", type=float, default=4.0)
    parser.add_argument("--faults", default="{}", help="fault script as JSON")
    args = parser.parse_args()
    config = EmulatorConfig(
        api_key=args.key,
        admin_key=args.admin_key,
        native_factor=args.native_factor,
        faults=FaultScript.model_validate_json(args.faults),
    )
    factory = create_fal_app if args.provider == "fal" else create_replicate_app
    uvicorn.run(
        factory(config),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
    )


if __name__ == "__main__":
    main()
