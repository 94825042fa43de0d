"""Many long upscales in flight at once: what the gateway costs per in-flight request, and
whether its event loop stays responsive, against the same flow sent straight to the provider.

    python -m bench.scale                          # N = 100, 300, 1000 at 10 s (3 minutes)
    python -m bench.scale --n 1000 --latency-s 5

For each N, N clients each send one distinct 512x512 PNG (about 420 KB) at once:
  direct   the fal queue protocol straight to the emulator (submit a data URI, poll the
           status, read the result, download the image)
  gateway  POST /v1/images/edits (multipart, native size), then GET the signed result URL
The emulator's jobs take --latency-s each (no jitter, native factor 1). The gateway runs on
core 0 alone; the emulator and this load generator share core 1 (sched_setaffinity, what
`taskset -c` sets), so what the gateway spends is what it costs, not the load generator's
queueing.

Figures per N (gateway against direct in the same run):
  throughput and p50/p99 of both, and the ratio of throughputs;
  event-loop lag: how late the gateway's probe task woke (every 10 ms), p99 and max;
  RSS per in-flight request while all N wait at the provider, as a multiple of its input
  bytes: (RSS then - RSS idle) / N / input bytes;
  gateway CPU-seconds per request (utime + stime from /proc) and its open descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from bench.hedging import quantile
from bench.imaging import sample_png
from bench.load import direct_flow, fal_emulator, gateway_env, gateway_flow
from bench.processes import Service, cpu_s, spawn, status_kib
from gateway.transport import ProviderTransport

GATEWAY_CORE, OTHER_CORE = {0}, {1}
SIDE = 512
WARM = 4  # requests before each measured burst (connections, imports, first-use caches)

Flow = Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]]


def distinct_png(index: int) -> bytes:
    """A photo-like image whose bytes no other index shares (its number drawn on it)."""
    img = Image.open(io.BytesIO(sample_png(SIDE, noise=28, compress_level=1)))
    ImageDraw.Draw(img).text((8, 8), f"{index:06d}", fill=(255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _check_native(data: bytes) -> None:
    """The answer is the provider's image: a PNG of the input's size (native x1)."""
    size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    if data[:8] != b"\x89PNG\r\n\x1a\n" or size != (SIDE, SIDE):
        raise ValueError(f"not a {SIDE}x{SIDE} PNG ({len(data)} bytes)")


def make_images(count: int) -> list[bytes]:
    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(distinct_png, range(count), chunksize=32))


@dataclass
class Burst:
    variant: str
    n: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failures: int = 0
    first_error: str = ""
    cpu_s: float = 0.0
    rss_idle_kib: int = 0
    rss_waiting_kib: int = 0  # the largest RSS seen while all N were at the provider
    waiting_samples: int = 0
    fds_idle: int = 0
    fds_peak: int = 0
    lag: list[float] = field(default_factory=list)
    gc: list[tuple[int, float]] = field(default_factory=list)  # (generation, seconds)
    polls: int = 0  # status calls the provider answered during the burst

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def q(self, p: float) -> float:
        return quantile(self.latencies, p) if self.latencies else float("nan")


def _fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


async def _emulator_counts(client: httpx.AsyncClient, emulator: Service) -> tuple[int, int, int]:
    """Jobs submitted and succeeded, and status calls answered, since the emulator started."""
    stats = (await client.get(f"{emulator.url}/_emulator/stats")).json()
    return tuple(int(stats.get(k, 0)) for k in ("submitted", "succeeded", "status_polls"))  # type: ignore[return-value]


async def run_burst(
    variant: str,
    flow: Flow,
    images: list[bytes],
    warm: list[bytes],
    emulator: Service,
    gateway: Service | None,
) -> Burst:
    n = len(images)
    burst = Burst(variant, n)
    limits = httpx.Limits(max_connections=n + WARM, max_keepalive_connections=n + WARM)
    transport = ProviderTransport(limits=limits)
    async with (
        httpx.AsyncClient(timeout=600, limits=limits, transport=transport) as client,
        httpx.AsyncClient(timeout=30) as admin,
    ):

        async def one(png: bytes, record: bool) -> None:
            started = time.perf_counter()
            try:
                data = await flow(client, png)
                _check_native(data)
            except (httpx.HTTPError, ValueError) as exc:
                burst.failures += 1
                if not burst.first_error:
                    text = exc.response.text[:200] if isinstance(exc, httpx.HTTPStatusError) else ""
                    burst.first_error = f"{exc!r} {text}"
                return
            if record:
                burst.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(png, False) for png in warm))
        pids = gateway.pids() if gateway else []
        if gateway:
            await admin.get(f"{gateway.url}/_bench/lag")  # the warm-up's samples go
            burst.rss_idle_kib = sum(status_kib(p, "VmRSS") for p in pids)
            burst.fds_idle = burst.fds_peak = _fds(pids)
            cpu_before = sum(cpu_s(p) for p in pids)
        submitted0, succeeded0, polls0 = await _emulator_counts(admin, emulator)
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                rss = 0
                burst.fds_peak = max(burst.fds_peak, _fds(pids))
                with suppress(httpx.HTTPError):  # a slow answer skips one sample
                    submitted, succeeded, _ = await _emulator_counts(admin, emulator)
                    # read after the counts: all N were at the provider before this RSS
                    rss = sum(status_kib(p, "VmRSS") for p in pids)
                    if not (submitted - submitted0 >= n and succeeded == succeeded0):
                        rss = 0
                if rss:
                    burst.waiting_samples += 1
                    burst.rss_waiting_kib = max(burst.rss_waiting_kib, rss)
                with suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.1)

        sampler = asyncio.create_task(sample())
        began = time.perf_counter()
        await asyncio.gather(*(one(png, True) for png in images))
        burst.seconds = time.perf_counter() - began
        done.set()
        await sampler
        burst.polls = (await _emulator_counts(admin, emulator))[2] - polls0
        if gateway:
            burst.cpu_s = sum(cpu_s(p) for p in pids) - cpu_before
            probed = (await admin.get(f"{gateway.url}/_bench/lag")).json()
            burst.lag, burst.gc = probed["samples"], [tuple(p) for p in probed["gc"]]
    return burst


def report(latency_s: float, input_bytes: float, bursts: list[tuple[Burst, Burst]]) -> None:
    print(
        f"\n{'N':>5} {'variant':8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'fail':>4}"
        f" {'thr/direct':>10} {'lag p99 ms':>10} {'lag max ms':>10} {'RSS/in-flight':>13}"
        f" {'CPU ms/req':>10} {'fds idle/peak':>13} {'polls/job':>9}"
    )
    for direct, gw in bursts:
        print(
            f"{direct.n:>5} {'direct':8} {direct.throughput:7.1f} {direct.q(0.5):7.2f}"
            f" {direct.q(0.99):7.2f} {direct.failures:>4} {'':>71} {direct.polls / direct.n:9.1f}"
        )
        lag_p99 = quantile(gw.lag, 0.99) * 1000 if gw.lag else float("nan")
        lag_max = max(gw.lag) * 1000 if gw.lag else float("nan")
        if gw.waiting_samples:
            grew = (gw.rss_waiting_kib - gw.rss_idle_kib) * 1024 / gw.n
            per_flight = f"{grew / input_bytes:12.2f}x"
        else:
            per_flight = f"{'n/a':>13}"
        done = max(1, len(gw.latencies))
        print(
            f"{gw.n:>5} {'gateway':8} {gw.throughput:7.1f} {gw.q(0.5):7.2f} {gw.q(0.99):7.2f}"
            f" {gw.failures:>4} {gw.throughput / direct.throughput:10.3f} {lag_p99:10.1f}"
            f" {lag_max:10.1f} {per_flight} {gw.cpu_s / done * 1000:10.1f}"
            f" {gw.fds_idle:>6}/{gw.fds_peak:<6} {gw.polls / gw.n:9.1f}"
        )
        full = [seconds for generation, seconds in gw.gc if generation == 2]
        print(
            f"      gateway gc: {len(gw.gc)} collections, {sum(s for _, s in gw.gc) * 1000:.0f} ms"
            f" in all; {len(full)} full, the longest {max(full, default=0) * 1000:.0f} ms"
        )
        for burst in (direct, gw):
            if burst.first_error:
                print(f"      {burst.variant} first failure: {burst.first_error}")
    print(
        f"\nthr/direct: throughput over direct's in the same run (target >= 0.95). lag: the"
        f" gateway's probe task, every 10 ms, over the burst (targets at N = 1,000: p99 <= 10"
        f" ms, max <= 50 ms). RSS/in-flight: (RSS while all N jobs wait at the provider -"
        f" idle RSS) / N, as a multiple of the {input_bytes / 1024:.0f} KiB input (target <="
        f" 1.5). polls/job: status calls the emulator answered per job. Jobs take"
        f" {latency_s:g} s at the emulator."
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--n", default="100,300,1000")
    parser.add_argument("--latency-s", type=float, default=10.0)
    parser.add_argument("--workdir", help="keep configs and logs here (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.n.split(",")]
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench.scale pins the gateway to a core of its own: it needs two")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(sizes) + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    started = time.perf_counter()
    images = make_images(max(sizes) + WARM)  # on both cores, before the pinning
    os.sched_setaffinity(0, OTHER_CORE)  # this load generator, and what it starts, on core 1
    warm, pool = images[:WARM], images[WARM:]
    input_bytes = sum(len(p) for p in pool) / len(pool)
    print(
        f"{len(images)} distinct {SIDE}x{SIDE} PNGs, {input_bytes / 1024:.0f} KiB on average,"
        f" made in {time.perf_counter() - started:.0f} s"
    )

    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(args.workdir or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        faults = f'{{"latency_ms": {args.latency_s * 1000}, "jitter_ms": 0}}'
        emulator = stack.enter_context(fal_emulator(tmp, faults, 1, OTHER_CORE))
        # One worker: bench.probed's route is in the one process it runs. N clients, plus
        # the benchmark's own reads, each on a connection of its own.
        env = gateway_env(tmp, emulator.url, 1, None, {"max_connections": max(sizes) + 64})
        gateway = stack.enter_context(
            spawn("gateway", ["-m", "bench.probed", "--port", "{port}"], "/healthz", env,
                  GATEWAY_CORE)
        )  # fmt: skip
        print(
            f"fal emulator: {args.latency_s:g} s per job, native x1; gateway on core"
            f" {min(GATEWAY_CORE)}, emulator and load generator on core {min(OTHER_CORE)}"
        )
        flows: dict[str, tuple[Flow, Service | None]] = {
            "direct": (direct_flow(emulator.url), None),
            "gateway": (gateway_flow(gateway.url, "url", scale_factor=None), gateway),
        }
        bursts: list[tuple[Burst, Burst]] = []
        for n in sizes:
            ran = {
                variant: asyncio.run(run_burst(variant, flow, pool[:n], warm, emulator, watched))
                for variant, (flow, watched) in flows.items()
            }
            bursts.append((ran["direct"], ran["gateway"]))
            print(f"  N = {n}: direct {ran['direct'].seconds:.1f} s, gateway"
                  f" {ran['gateway'].seconds:.1f} s")  # fmt: skip
        report(args.latency_s, input_bytes, bursts)


if __name__ == "__main__":
    main()
