"""The benchmarks' processes: started on free loopback ports, waited for, stopped; and what
each one spends (resident memory, its peak, CPU), read from /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.integration.nginx_lb import NGINX, NginxLB
from tests.integration.redis_server import RedisServer
from tests.integration.servers import ROOT, free_port

# -- processes -----------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """The process and its children (uvicorn's worker processes)."""
        pids = [self.proc.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.append(int(entry.name))
        return pids


@contextmanager
def spawn(
    name: str,
    args: list[str],
    ready: str,
    env: dict[str, str],
    cpus: set[int] | None = None,
) -> Iterator[Service]:
    """`cpus`: the cores the process may run on (what `taskset -c` sets), else any."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(env["BENCH_TMP"]) / f"{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, *[a.replace("{port}", str(port)) for a in args]],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log.name}")
            try:
                if httpx.get(url + ready, timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield Service(name, url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def nginx_proxy(upstream: Service, workdir: Path) -> Iterator[Service | None]:
    """Debian's nginx from deploy/nginx.conf (the edge compose ships) in front of `upstream`,
    its logs kept in `workdir`; None if nginx is not installed. It passes the client's Host
    on, so the fal emulator's queue and file URLs point back through it."""
    if not Path(NGINX).exists():
        yield None
        return
    port = int(upstream.url.rsplit(":", 1)[1])
    with NginxLB([port], log_dir=workdir) as lb:
        assert lb.proc is not None
        yield Service("nginx", lb.url, lb.proc)


def redis_url(stack: ExitStack, workdir: Path) -> str | None:
    """A redis-server of the benchmark's own, stopped with `stack`; None if not installed."""
    if shutil.which("redis-server") is None:
        return None
    server = RedisServer(workdir).start()
    stack.callback(server.stop)
    return server.url


def status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Usage:
    """Resident memory and CPU of a service over one cell."""

    rss_start_kib: int = 0
    peak_kib: int = 0
    cpu_s: float = 0.0

    @classmethod
    def start(cls, service: Service) -> tuple[Usage, list[int], float]:
        pids = service.pids()
        for pid in pids:
            # "5" resets the peak (VmHWM) to the current RSS: each cell gets its own peak.
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        usage = cls(rss_start_kib=sum(status_kib(p, "VmRSS") for p in pids))
        return usage, pids, sum(cpu_s(p) for p in pids)

    def finish(self, pids: list[int], cpu_before: float) -> Usage:
        self.peak_kib = sum(status_kib(p, "VmHWM") for p in pids)
        self.cpu_s = sum(cpu_s(p) for p in pids) - cpu_before
        return self


class Watch:
    """Every service's figures from the moment a cell's warm-up is over."""

    def __init__(self, services: dict[str, Service]):
        self.services = services
        self.started: dict[str, tuple[Usage, list[int], float]] = {}
        self.own_cpu = 0.0

    def start(self) -> None:
        self.started = {name: Usage.start(s) for name, s in self.services.items()}
        self.own_cpu = time.process_time()
