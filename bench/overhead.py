"""What the gateway adds to a request, measured against calling the provider directly and
against a bare reverse proxy, in one run, interleaved.

    python -m bench.overhead                       # the full matrix (about 5 minutes)
    python -m bench.overhead --soak 600            # RSS over a 10-minute run instead

Processes (all on loopback, all sharing the machine's cores, unpinned): the fal emulator
with 0 ms service time, the gateway (fal only, so every request takes the same path), the
bare proxy of bench/proxy.py in front of the same emulator, Debian's nginx in front of it
too (deploy/nginx.conf, the edge compose ships: the floor of what carrying the bytes costs),
and this load generator.

Each cell is one way of getting the upscaled image's bytes into the client:
  direct      the fal queue protocol as a user of fal would speak it: submit (data URI),
              poll the status URL, read the result, download the image
  proxy       the same, every call through the bare proxy
  nginx       the same, every call through nginx
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
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.imaging import sample_png as photo_png
from bench.load import NATIVE, Cell, direct_flow, drive, fal_emulator, gateway_env, gateway_flow
from bench.processes import Service, Watch, nginx_proxy, redis_url, spawn, status_kib


def sample_png(side: int) -> bytes:
    """A photo-like image (gradients plus mild noise): PNG sizes like a real photo's."""
    return photo_png(side, noise=12, compress_level=6)


def start_gateway(
    stack: ExitStack,
    name: str,
    tmp: Path,
    fal_url: str,
    workers: int = 1,
    redis: str | None = None,
) -> Service:
    return stack.enter_context(
        spawn(
            name,
            ["-m", "gateway", "--port", "{port}"],
            "/healthz",
            gateway_env(tmp, fal_url, workers, redis),
        )
    )


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
    carriers: dict[str, str],
) -> None:
    """`carriers`: variant -> the service whose process carries its bytes."""
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
    # The unloaded target is about a 1 MP output: the first size whose output is that small.
    one_mp = [s for s in sides if (s * NATIVE) ** 2 <= 2**20][:1] if 1 in concurrencies else []
    for side in one_mp:
        direct = cells[("direct", side, 1)].quantile(0.5)
        added = {
            v: (cells[(v, side, 1)].quantile(0.5) - direct) * 1000
            for v in ("gateway-url", "gateway-b64")
        }
        print(
            f"unloaded, {side}x{side} -> {side * NATIVE}x{side * NATIVE} (1 MP out), p50 over"
            f" direct: url +{added['gateway-url']:.1f} ms, b64_json +{added['gateway-b64']:.1f}"
            " ms (target <= +2 ms)"
        )
    print("\nhow the two cores were spent: CPU ms per request, by process (all cells pooled)")
    order = ("direct", "proxy", "nginx", "gateway-url", "gateway-b64")
    variants = [v for v in order if v in carriers]
    relays = [n for n in ("proxy", "nginx") if n in carriers]
    names = ["load generator", "emulator", *relays, "gateway"]
    print(f"{'variant':12} {'size':>5} " + " ".join(f"{n:>14}" for n in names))
    spent: dict[tuple[str, int], float] = {}  # (variant, side) -> its own service's CPU ms
    for side in sides:
        for variant in variants:
            pooled = [c for (v, s, _), c in cells.items() if (v, s) == (variant, side)]
            done = sum(len(c.latencies) for c in pooled) or 1
            figures = {n: sum(c.cpu_s.get(n, 0.0) for c in pooled) / done * 1000 for n in names}
            spent[(variant, side)] = figures.get(carriers[variant], 0.0)
            print(f"{variant:12} {side:>5} " + " ".join(f"{figures[n]:14.1f}" for n in names))
    print(
        "\nCPU per request of the process carrying the bytes, as ratios (all cells pooled;"
        " the target is gateway / proxy <= 1.0):"
    )
    floor = "nginx" in carriers
    print(
        f"{'size':>5} {'gateway-url/proxy':>17} {'gateway-b64/proxy':>17}"
        + (f" {'gateway-url/nginx':>17} {'proxy/nginx':>11}" if floor else "")
    )
    for side in sides:
        proxy = spent[("proxy", side)]
        line = (
            f"{side:>5} {spent[('gateway-url', side)] / proxy:17.2f}"
            f" {spent[('gateway-b64', side)] / proxy:17.2f}"
        )
        if floor:
            nginx = spent[("nginx", side)]
            line += f" {spent[('gateway-url', side)] / nginx:17.2f} {proxy / nginx:11.2f}"
        print(line)


def soak(gateway: Service, png: bytes, expect: int, seconds: float, concurrency: int) -> None:
    """RSS and open files of the gateway, sampled while it serves a steady load."""
    samples: list[tuple[float, int, int]] = []
    cell = Cell("gateway-url", 0, concurrency)

    async def sampler(stop: float) -> None:
        started = time.perf_counter()
        while time.perf_counter() < stop:
            pids = gateway.pids()
            rss = sum(status_kib(p, "VmRSS") for p in pids)
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
    parser.add_argument("--sizes", default="256,512,1024")
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
        emulator = stack.enter_context(fal_emulator(tmp, faults))
        gateway = start_gateway(stack, "gateway", tmp, emulator.url)
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
        nginx = stack.enter_context(nginx_proxy(emulator, tmp))
        services = {"emulator": emulator, "gateway": gateway, "proxy": proxy}
        variants = {
            "direct": ("emulator", direct_flow(emulator.url)),
            "proxy": ("proxy", direct_flow(proxy.url)),
            "gateway-url": ("gateway", gateway_flow(gateway.url, "url")),
            "gateway-b64": ("gateway", gateway_flow(gateway.url, "b64_json")),
        }
        if nginx is None:
            print("nginx is not installed: no nginx column")
        else:
            services["nginx"] = nginx
            variants["nginx"] = ("nginx", direct_flow(nginx.url))
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
        report(cells, sides, concurrencies, images, {v: c for v, (c, _) in variants.items()})
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
    redis = redis_url(stack, tmp)
    one = start_gateway(stack, "gateway-1w", tmp, emulator.url, 1, redis)
    two = start_gateway(stack, "gateway-2w", tmp, emulator.url, 2, redis)
    watched = {"emulator": emulator, "gateway": one}
    variants = {"1 worker": ("gateway", gateway_flow(one.url, "url"))}
    cells_one = run_matrix(watched, variants, [512], [64], args.rounds, args.seconds)
    watched["gateway"] = two
    variants = {"2 workers": ("gateway", gateway_flow(two.url, "url"))}
    cells_two = run_matrix(watched, variants, [512], [64], args.rounds, args.seconds)
    a, b = cells_one[("1 worker", 512, 64)], cells_two[("2 workers", 512, 64)]
    state = "on one redis-server" if redis else "in-process (no redis-server found)"
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


if __name__ == "__main__":
    main()
