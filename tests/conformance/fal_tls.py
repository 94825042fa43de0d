"""The fal emulator served over TLS, and a copy of the official `fal_client` pointed at it.

fal-client 1.0.3 speaks https only and fixes its queue host when it is imported
(`FAL_QUEUE_RUN_HOST` in fal_client/auth.py, turned into `QUEUE_URL_FORMAT` in client.py).
So the emulator starts first on a free port, and then a fresh copy of the `fal_client`
modules is imported with the environment naming that port; the copy is dropped afterwards
and whatever `fal_client` modules were loaded before are put back, so the rest of the test
process sees no change. Trust goes through `SSL_CERT_FILE` (httpx honours it when a client
is built, which fal_client does lazily on first use), auth through `FAL_KEY`; both stay set
while the copy is in use and are restored after."""

from __future__ import annotations

import contextlib
import importlib
import os
import ssl
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import trustme

from adapters.emulators import BackgroundServer, EmulatorConfig, create_fal_app

FAL_KEY = "conformance-fal-key"
APP = "fal-ai/recraft/upscale/crisp"


@dataclass(frozen=True, slots=True)
class FalTLS:
    url: str  # https://127.0.0.1:<port>
    host: str  # 127.0.0.1:<port>, what FAL_QUEUE_RUN_HOST names
    ca_file: Path
    ssl_context: ssl.SSLContext  # trusts only the test CA
    client: ModuleType  # the fal_client copy bound to this emulator
    admin: httpx.Client  # the emulator's admin routes and raw queue calls, over TLS

    def jobs(self) -> dict[str, dict[str, Any]]:
        body = self.admin.get("/_emulator/jobs").json()
        return {job["id"]: job for job in body["jobs"]}

    def requests(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.admin.get("/_emulator/requests").json()["requests"]
        return records

    def stats(self) -> dict[str, int]:
        counters: dict[str, int] = self.admin.get("/_emulator/stats").json()
        return counters

    def faults(self, **script: Any) -> None:
        self.admin.put("/_emulator/faults", json=script).raise_for_status()


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A throwaway CA and a server certificate for the loopback names: (ca.pem, server.pem
    holding the key and the chain, as uvicorn's ssl_certfile takes them)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, server_file = directory / "ca.pem", directory / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_and_cert_chain_pem.write_to_path(str(server_file))
    return ca_file, server_file


def _fal_modules() -> dict[str, ModuleType]:
    return {
        name: module
        for name, module in sys.modules.items()
        if name == "fal_client" or name.startswith("fal_client.")
    }


@contextlib.contextmanager
def fresh_fal_client(env: Mapping[str, str]) -> Iterator[ModuleType]:
    """`fal_client` imported anew with `env` set; on exit the environment and any
    previously imported fal_client modules are as they were."""
    saved_env = {name: os.environ.get(name) for name in env}
    saved_modules = _fal_modules()
    for name in saved_modules:
        del sys.modules[name]
    os.environ.update(env)
    try:
        yield importlib.import_module("fal_client")
    finally:
        for name in _fal_modules():
            del sys.modules[name]
        sys.modules.update(saved_modules)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _close_clients(module: ModuleType) -> None:
    """Close the pooled httpx client the module-level SyncClient built, if it built one
    (a cached_property: present in the instance's __dict__ only once used)."""
    pooled = module.sync_client.__dict__.get("_client")
    if isinstance(pooled, httpx.Client):
        pooled.close()


@contextlib.contextmanager
def serve_fal_tls(directory: Path, config: EmulatorConfig) -> Iterator[FalTLS]:
    """The fal emulator on https://127.0.0.1:<free port> and a fal_client copy aimed at it."""
    ca_file, server_file = make_certificates(directory)
    context = ssl.create_default_context(cafile=str(ca_file))
    with BackgroundServer(create_fal_app(config), ssl_certfile=str(server_file)) as server:
        assert server.url.startswith("https://"), server.url
        host = server.url.removeprefix("https://")
        env = {"FAL_QUEUE_RUN_HOST": host, "SSL_CERT_FILE": str(ca_file), "FAL_KEY": FAL_KEY}
        with (
            fresh_fal_client(env) as module,
            httpx.Client(base_url=server.url, verify=context, timeout=10) as admin,
        ):
            # The copy must really be bound to this emulator, or every test below would be
            # talking to queue.fal.run (and fail for the wrong reason).
            assert f"https://{host}/" == module.client.QUEUE_URL_FORMAT
            try:
                yield FalTLS(server.url, host, ca_file, context, module, admin)
            finally:
                _close_clients(module)
