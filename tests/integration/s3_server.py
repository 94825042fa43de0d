"""An S3-compatible server of the tests' own: moto's standalone server (`moto[server]`) as a
separate process on a free port, offline, in memory. `pause` / `resume` freeze it (a store
that accepts connections and never answers: every call runs into its timeout); `stop` then
`start` is a store that is down, then back empty (its buckets are made again)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.servers import free_port

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "us-east-1"


class S3Server:
    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.buckets: set[str] = set()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> S3Server:
        with (self.workdir / f"moto-{self.port}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise RuntimeError("moto server did not start")
        for bucket in self.buckets:  # a restart comes back empty
            self._make(bucket)
        return self

    def bucket(self, name: str) -> str:
        self._make(name)
        self.buckets.add(name)
        return name

    def _make(self, name: str) -> None:
        httpx.put(f"{self.url}/{name}", timeout=10).raise_for_status()

    def env(self, bucket: str, prefix: str = "", **extra: str) -> dict[str, str]:
        """What a gateway needs to keep its results in `bucket` under `prefix`."""
        return {
            "GATEWAY_RESULTS_URL": f"s3://{bucket}/{prefix}".rstrip("/"),
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            **extra,
        }

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under `prefix` (path-style ListObjectsV2, one page is plenty here)."""
        response = httpx.get(
            f"{self.url}/{bucket}", params={"list-type": "2", "prefix": prefix}, timeout=10
        )
        response.raise_for_status()
        text = response.text
        return [part.split("</Key>")[0] for part in text.split("<Key>")[1:]]

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
