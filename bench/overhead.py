"""What the gateway adds to a request, measured against calling the provider directly and
against a bare reverse proxy, in one run, interleaved.

    python -m bench.overhead                       # the full matrix (about 3 minutes)
    python -m bench.overhead --soak 600            # RSS over a 10-minute run instead

Processes (all on loopback, all sharing the machine's cores, unpinned): the fal emulator
with 0 ms service time, the gateway (fal only, so every request takes the same path), the
bare proxy of bench/proxy.py in front of the same emulator, and this load generator.

Each cell is one way of getting the upscaled image's bytes into the client:
  direct      the fal queue protocol as a user of fal would speak it: submit (data URI),
              poll the status URL, read the result, download the image
  proxy       the same, every call through the bare proxy
  gateway-url POST /v1/images/edits (multipart, as the openai SDK sends it), then GET the
              signed URL it returns
  gateway-b64 the same with response_format=b64_json, decoded in the client
The scale factor is the emulator's native 4, so the gateway passes the provider's bytes
through (the pass-through path the targets are about). Cells run for --seconds each, turn
about, --rounds times, so that drift in the machine's load hits every variant alike.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from PIL import Image

from gateway.transport import ProviderTransport

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"
MODEL_PATH = "fal-ai/recraft/upscale/crisp"
NATIVE = 4
CONFIG = yaml.safe_load((ROOT / "config/gateway.yaml").read_text())
POLL = CONFIG["providers"]["fal"]


def sample_png(side: int) -> bytes:
    """A photo-like image (gradients plus mild noise): PNG sizes like a real photo's."""
    base = Image.linear_gradient("L").resize((side, side))
    noise = Image.effect_noise((side, side), 12)
    img = Image.merge("RGB", (base, noise, base.rotate(90)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
def spawn(name: str, args: list[str], ready: str, env: dict[str, str]) -> Iterator[Service]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(env["BENCH_TMP"]) / f"{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, *[a.replace("{port}", str(port)) for a in args]],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
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


def gateway_env(tmp: Path, fal_url: str, workers: int, redis_url: str | None) -> dict[str, str]:
    config = {
        **CONFIG,
        "routing": {**CONFIG["routing"], "explore_share": 0},
    }
    path = tmp / f"gateway-{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        "BENCH_TMP": str(tmp),
        "FAL_KEY": KEY,
        "GATEWAY_FAL_URL": fal_url,
        "GATEWAY_CONFIG": str(path),
        "GATEWAY_RESULTS_DIR": str(tmp / f"results-{workers}"),
        "GATEWAY_SIGNING_KEY": "bench-signing-key-0123456789abcdef",
        "GATEWAY_WORKERS": str(workers),
        "GATEWAY_LOG_LEVEL": "info",  # the access line per request is part of the real path
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


# -- process figures from /proc ------------------------------------------------------------


def _status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
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
        usage = cls(rss_start_kib=sum(_status_kib(p, "VmRSS") for p in pids))
        return usage, pids, sum(_cpu_s(p) for p in pids)

    def finish(self, pids: list[int], cpu_before: float) -> Usage:
        self.peak_kib = sum(_status_kib(p, "VmHWM") for p in pids)
        self.cpu_s = sum(_cpu_s(p) for p in pids) - cpu_before
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


# -- the clients ---------------------------------------------------------------------------


def direct_flow(base: str) -> Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]]:
    auth = {"Authorization": f"Key {KEY}"}

    async def run(client: httpx.AsyncClient, png: bytes) -> bytes:
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        submitted = await client.post(f"{base}/{MODEL_PATH}", json={"image_url": uri}, headers=auth)
        submitted.raise_for_status()
        queue = submitted.json()
        delay = POLL["poll_initial_s"]  # the gateway's own polling schedule
        while True:
            status = await client.get(queue["status_url"], headers=auth)
            if status.json()["status"] == "COMPLETED":
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, POLL["poll_max_s"])
        result = await client.get(queue["response_url"], headers=auth)
        result.raise_for_status()
        image = await client.get(result.json()["image"]["url"])
        image.raise_for_status()
        return image.content

    return run


def gateway_flow(
    base: str, response_format: str
) -> Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]]:
    async def run(client: httpx.AsyncClient, png: bytes) -> bytes:
        answer = await client.post(
            f"{base}/v1/images/edits",
            files={"image": ("image.png", png, "image/png")},
            data={
                "model": "recraft-crisp-upscale",
                "scale_factor": str(NATIVE),
                "response_format": response_format,
            },
        )
        answer.raise_for_status()
        item = answer.json()["data"][0]
        if response_format == "b64_json":
            return base64.b64decode(item["b64_json"])
        image = await client.get(item["url"])
        image.raise_for_status()
        return image.content

    return run


@dataclass
class Cell:
    variant: str
    side: int
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failures: int = 0
    peak_kib: int = 0  # of the service behind the variant
    rss_start_kib: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def fail(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            detail = exc.response.text[:300] if isinstance(exc, httpx.HTTPStatusError) else ""
            print(f"  {self.variant} {self.side} c{self.concurrency}: {exc!r} {detail}")

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def drive(
    flow: Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]],
    png: bytes,
    expect_bytes: int,
    concurrency: int,
    seconds: float,
    cell: Cell,
    warmed: Callable[[], None] = lambda: None,
) -> None:
    """A closed loop: `concurrency` clients, each sending its next request on an answer."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # The gateway's own provider transport (aiohttp under httpx): the cheaper the load
    # generator, the more of the shared cores go to what is measured.
    transport = ProviderTransport(limits=limits)
    async with httpx.AsyncClient(timeout=120, limits=limits, transport=transport) as client:

        async def attempt() -> bool:
            try:
                data = await flow(client, png)
            except httpx.HTTPError as exc:
                cell.fail(exc)
                return False
            if len(data) != expect_bytes:  # not the provider's bytes: the measurement is void
                cell.fail(ValueError(f"{len(data)} bytes, not {expect_bytes}"))
                return False
            return True

        await asyncio.gather(*(attempt() for _ in range(min(concurrency, 4))))  # warm-up
        warmed()
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                if await attempt():
                    cell.latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.seconds += time.perf_counter() - began


# -- the run -------------------------------------------------------------------------------


def run_matrix(
    services: dict[str, Service],
    variants: dict[str, tuple[str, Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]]]],
    sides: list[int],
    concurrencies: list[int],
    rounds: int,
    seconds: float,
) -> dict[tuple[str, int, int], Cell]:
    images = {side: sample_png(side) for side in sides}
    expect = {side: len(_native_output(services["emulator"], images[side])) for side in sides}
    cells: dict[tuple[str, int, int], Cell] = {}
    order = list(variants)
    for round_no in range(rounds):
        for side in sides:
            for concurrency in concurrencies:
                turn = order[round_no % len(order) :] + order[: round_no % len(order)]
                for variant in turn:
                    service_name, flow = variants[variant]
                    cell = cells.setdefault(
                        (variant, side, concurrency), Cell(variant, side, concurrency)
                    )
                    watch = Watch(services)
                    asyncio.run(
                        drive(
                            flow,
                            images[side],
                            expect[side],
                            concurrency,
                            seconds,
                            cell,
                            watch.start,
                        )
                    )
                    cell.cpu_s["load generator"] = (
                        cell.cpu_s.get("load generator", 0.0) + time.process_time() - watch.own_cpu
                    )
                    for name, (usage, pids, cpu_before) in watch.started.items():
                        done = usage.finish(pids, cpu_before)
                        cell.cpu_s[name] = cell.cpu_s.get(name, 0.0) + done.cpu_s
                        grew = done.peak_kib - done.rss_start_kib
                        if name == service_name and grew > cell.peak_kib - cell.rss_start_kib:
                            cell.peak_kib, cell.rss_start_kib = done.peak_kib, done.rss_start_kib
    return cells


def _native_output(emulator: Service, png: bytes) -> bytes:
    async def once() -> bytes:
        async with httpx.AsyncClient(timeout=60) as client:
            return await direct_flow(emulator.url)(client, png)

    return asyncio.run(once())


def report(
    cells: dict[tuple[str, int, int], Cell],
    sides: list[int],
    concurrencies: list[int],
    images: dict[int, tuple[int, int]],
) -> None:
    print(
        f"{'variant':12} {'size':>5} {'conc':>4} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>7} {'peak RSS MiB':>12} {'fail':>4}"
    )
    for (variant, side, concurrency), cell in sorted(cells.items(), key=lambda i: i[0][1:]):
        print(
            f"{variant:12} {side:>5} {concurrency:>4} {len(cell.latencies):>6} "
            f"{cell.quantile(0.5) * 1000:8.1f} {cell.quantile(0.99) * 1000:8.1f} "
            f"{cell.throughput:7.1f} {cell.peak_kib / 1024:12.0f} {cell.failures:>4}"
        )
    print("\nthe gateway against direct (a) and the bare proxy (c):")
    print(
        f"{'variant':12} {'size':>5} {'conc':>4} {'+p50 ms':>8} {'+p99 ms':>8} "
        f"{'thr/proxy':>9} {'RSS/in-flight':>13} {'x image':>7}"
    )
    for side in sides:
        in_bytes, out_bytes = images[side]
        for concurrency in concurrencies:
            direct = cells[("direct", side, concurrency)]
            proxy = cells[("proxy", side, concurrency)]
            for variant in ("gateway-url", "gateway-b64"):
                cell = cells[(variant, side, concurrency)]
                per_flight = (cell.peak_kib - cell.rss_start_kib) * 1024 / concurrency
                print(
                    f"{variant:12} {side:>5} {concurrency:>4} "
                    f"{(cell.quantile(0.5) - direct.quantile(0.5)) * 1000:8.1f} "
                    f"{(cell.quantile(0.99) - direct.quantile(0.99)) * 1000:8.1f} "
                    f"{cell.throughput / proxy.throughput:9.2f} "
                    f"{per_flight / 2**20:11.1f}Mi {per_flight / (in_bytes + out_bytes):7.2f}"
                )
    print(
        "RSS/in-flight: (peak RSS - RSS at the cell's start) / concurrency; 'x image' divides"
        " it by the request's image bytes (input + output)."
    )
    print("\nhow the two cores were spent: CPU ms per request, by process (all cells pooled)")
    names = ("load generator", "emulator", "proxy", "gateway")
    print(f"{'variant':12} {'size':>5} " + " ".join(f"{n:>14}" for n in names))
    for side in sides:
        for variant in ("direct", "proxy", "gateway-url", "gateway-b64"):
            pooled = [c for (v, s, _), c in cells.items() if (v, s) == (variant, side)]
            done = sum(len(c.latencies) for c in pooled) or 1
            figures = [sum(c.cpu_s.get(n, 0.0) for c in pooled) / done * 1000 for n in names]
            print(f"{variant:12} {side:>5} " + " ".join(f"{f:14.1f}" for f in figures))


def soak(gateway: Service, png: bytes, expect: int, seconds: float, concurrency: int) -> None:
    """RSS and open files of the gateway, sampled while it serves a steady load."""
    samples: list[tuple[float, int, int]] = []
    cell = Cell("gateway-url", 0, concurrency)

    async def sampler(stop: float) -> None:
        started = time.perf_counter()
        while time.perf_counter() < stop:
            pids = gateway.pids()
            rss = sum(_status_kib(p, "VmRSS") for p in pids)
            fds = sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids)
            samples.append((time.perf_counter() - started, rss, fds))
            await asyncio.sleep(max(1.0, seconds / 60))

    async def both() -> None:
        stop = time.perf_counter() + seconds
        await asyncio.gather(
            drive(gateway_flow(gateway.url, "url"), png, expect, concurrency, seconds, cell),
            sampler(stop),
        )

    asyncio.run(both())
    warm = [s for s in samples if s[0] >= min(60.0, seconds / 5)]
    first, last = warm[0], warm[-1]
    top = max(s[1] for s in warm)
    print(
        f"soak {seconds:.0f} s at concurrency {concurrency}: {len(cell.latencies)} requests, "
        f"{cell.failures} failed, p50 {cell.quantile(0.5) * 1000:.1f} ms, "
        f"p99 {cell.quantile(0.99) * 1000:.1f} ms"
    )
    print(
        f"RSS after warm-up {first[1] / 1024:.0f} MiB -> end {last[1] / 1024:.0f} MiB "
        f"(max {top / 1024:.0f} MiB): growth {(last[1] - first[1]) / first[1] * 100:+.1f} %; "
        f"open files {first[2]} -> {last[2]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5, help="per cell and round")
    parser.add_argument("--soak", type=float, default=0, help="seconds of soak instead")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--workdir", help="keep configs and logs here (default: a temp dir)")
    args = parser.parse_args()
    sides = [int(s) for s in args.sizes.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(args.workdir or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        base_env = {"BENCH_TMP": str(tmp)}
        faults = '{"latency_ms": 0, "jitter_ms": 0}'
        emulator = stack.enter_context(
            spawn(
                "emulator",
                ["-m", "adapters.emulators", "fal", "--port", "{port}", "--key", KEY,
                 "--faults", faults],
                "/_emulator/faults",
                base_env,
            )
        )  # fmt: skip
        gateway = stack.enter_context(
            spawn(
                "gateway",
                ["-m", "gateway", "--port", "{port}"],
                "/healthz",
                gateway_env(tmp, emulator.url, 1, None),
            )
        )
        if args.soak:
            png = sample_png(sides[0])
            soak(gateway, png, len(_native_output(emulator, png)), args.soak, 32)
            return
        proxy = stack.enter_context(
            spawn(
                "proxy",
                ["-m", "bench.proxy", "--upstream", emulator.url, "--port", "{port}"],
                "/_emulator/faults",
                base_env,
            )
        )
        services = {"emulator": emulator, "gateway": gateway, "proxy": proxy}
        variants = {
            "direct": ("emulator", direct_flow(emulator.url)),
            "proxy": ("proxy", direct_flow(proxy.url)),
            "gateway-url": ("gateway", gateway_flow(gateway.url, "url")),
            "gateway-b64": ("gateway", gateway_flow(gateway.url, "b64_json")),
        }
        print(
            f"emulator 0 ms service time, native x{NATIVE}; {args.rounds} rounds x "
            f"{args.seconds:g} s per cell; {os.cpu_count()} cores shared by all processes\n"
        )
        cells = run_matrix(services, variants, sides, concurrencies, args.rounds, args.seconds)
        images = {}
        for side in sides:
            png = sample_png(side)
            images[side] = (len(png), len(_native_output(emulator, png)))
            print(
                f"{side}x{side} PNG: {images[side][0] / 1024:.0f} KiB in, "
                f"{images[side][1] / 1024:.0f} KiB out ({side * NATIVE}x{side * NATIVE})"
            )
        print()
        report(cells, sides, concurrencies, images)
        if not args.no_scaling:
            scaling(stack, tmp, emulator, services, args)


def scaling(
    stack: ExitStack,
    tmp: Path,
    emulator: Service,
    services: dict[str, Service],
    args: argparse.Namespace,
) -> None:
    """One gateway worker process against two, both on one Redis (the way several workers
    share routing state), 512x512 url at concurrency 64."""
    redis_url = _redis(stack, tmp)
    one = stack.enter_context(
        spawn(
            "gateway-1w",
            ["-m", "gateway", "--port", "{port}"],
            "/healthz",
            gateway_env(tmp, emulator.url, 1, redis_url),
        )
    )
    two = stack.enter_context(
        spawn(
            "gateway-2w",
            ["-m", "gateway", "--port", "{port}"],
            "/healthz",
            gateway_env(tmp, emulator.url, 2, redis_url),
        )
    )
    watched = {"emulator": emulator, "gateway": one}
    variants = {"1 worker": ("gateway", gateway_flow(one.url, "url"))}
    cells_one = run_matrix(watched, variants, [512], [64], args.rounds, args.seconds)
    watched["gateway"] = two
    variants = {"2 workers": ("gateway", gateway_flow(two.url, "url"))}
    cells_two = run_matrix(watched, variants, [512], [64], args.rounds, args.seconds)
    a, b = cells_one[("1 worker", 512, 64)], cells_two[("2 workers", 512, 64)]
    state = "on one redis-server" if redis_url else "in-process (no redis-server found)"
    print(
        f"\nscaling, 512x512 url, concurrency 64, routing state {state}; the load generator,"
        " the emulator and the gateway's workers share both cores, unpinned:"
    )
    for cell in (a, b):
        per_request = cell.cpu_s["gateway"] / max(1, len(cell.latencies)) * 1000
        print(
            f"  {cell.variant:9}: {cell.throughput:6.1f} req/s"
            f"  p50 {cell.quantile(0.5) * 1000:6.1f} ms  p99 {cell.quantile(0.99) * 1000:6.1f} ms"
            f"  gateway CPU {per_request:.1f} ms/req"
        )
    print(f"  throughput 2 workers / 1 worker: {b.throughput / a.throughput:.2f}")


def _redis(stack: ExitStack, tmp: Path) -> str | None:
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
    )
    stack.callback(proc.wait)
    stack.callback(proc.terminate)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


if __name__ == "__main__":
    main()
