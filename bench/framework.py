"""The gateway's CPU per upscale request before and after the move from Starlette to FastAPI,
in one run: the baseline (git commit 77ab98d, the last Starlette version) and the current
working tree, under the same load, against the same fal emulator.

    python -m bench.framework                      # 4 rounds x 100 requests per cell
    python -m bench.framework --rounds 5 --requests 400

The baseline is a detached git worktree in a temporary directory (removed at the end), run
with the same venv and PYTHONPATH pointing at it; PYTHONSAFEPATH keeps the working directory
(this tree) off sys.path, so the baseline cannot import the current code by accident. Each
gateway prints where it imported gateway.app from, and /openapi.json (FastAPI only) is
probed as a second check.

A cell is one response_format at one concurrency. Each cell sends a fixed number of
512x512 PNG uploads (after a few unmeasured warm-up requests) and reads the gateway's
utime+stime from /proc/<pid>/stat before and after. The two gateways take turns on every
cell (A B, then B A in the next round, ...), so drift in the machine's load hits both alike.
The emulator's CPU per request is printed as a control: the load was the same if it matches.
The exit code is always 0: this is a measurement, the figures are for the closing note.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from bench.load import KEY, NATIVE, Cell, gateway_flow
from bench.overhead import _native_output, gateway_env, sample_png
from bench.processes import Service, cpu_s, spawn
from gateway.transport import ProviderTransport
from tests.integration.servers import ROOT

BASELINE = "77ab98d"
GATEWAYS = ("baseline", "current")
FORMATS = ("b64_json", "url")
# The same entry point as `python -m gateway`, first printing where the code came from: the
# check is made by the measured process itself, not by a look-alike started beside it.
LAUNCH = (
    "import sys, gateway.app; "
    "print('gateway.app from', gateway.app.__file__, 'fastapi' in sys.modules, flush=True); "
    "from gateway.__main__ import main; main(['--port', '{port}'])"
)


@contextmanager
def baseline_tree(commit: str) -> Iterator[Path]:
    """The baseline's code in a detached worktree: /work/main's own checkout is untouched."""
    parent = Path(tempfile.mkdtemp(prefix="bench-framework-"))
    tree = parent / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
        check=True,
        capture_output=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(parent, ignore_errors=True)


def start_gateway_from(stack: ExitStack, name: str, tmp: Path, fal_url: str, code: Path) -> Service:
    """bench.overhead.start_gateway with the gateway's code taken from `code`."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**gateway_env(tmp, fal_url, 1, None), "PYTHONPATH": str(code), "PYTHONSAFEPATH": "1"}
    service = stack.enter_context(spawn(name, ["-c", LAUNCH], "/healthz", env))
    origin = next(
        line.split(" ", 3)[2:]
        for line in (tmp / f"{name}.log").read_text().splitlines()
        if line.startswith("gateway.app from ")
    )
    module_file, fastapi_loaded = Path(origin[0]), origin[1] == "True"
    if not module_file.is_relative_to(code):
        raise RuntimeError(f"{name} imported gateway.app from {module_file}, not from {code}")
    openapi = httpx.get(service.url + "/openapi.json", timeout=10).status_code
    print(
        f"{name:8} gateway.app from {module_file}; fastapi imported: {fastapi_loaded}; "
        f"GET /openapi.json -> {openapi}"
    )
    return service


async def drive_requests(
    flow: Callable[[httpx.AsyncClient, bytes], Awaitable[bytes]],
    png: bytes,
    expect_bytes: int,
    concurrency: int,
    requests: int,
    cell: Cell,
    warmed: Callable[[], None],
) -> None:
    """bench.load.drive with a fixed number of requests instead of a fixed time, so both
    gateways do the same work (a closed loop of `concurrency` clients, the same client)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = ProviderTransport(limits=limits)
    async with httpx.AsyncClient(timeout=120, limits=limits, transport=transport) as client:

        async def attempt() -> bool:
            try:
                data = await flow(client, png)
            except httpx.HTTPError as exc:
                cell.fail(exc)
                return False
            if len(data) != expect_bytes:
                cell.fail(ValueError(f"{len(data)} bytes, not {expect_bytes}"))
                return False
            return True

        await asyncio.gather(*(attempt() for _ in range(min(concurrency, 4))))  # warm-up
        warmed()
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                started = time.perf_counter()
                if await attempt():
                    cell.latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.seconds += time.perf_counter() - began


def measure(
    gateway: Service, emulator: Service, fmt: str, png: bytes, expect: int, conc: int, n: int
) -> Cell:
    """One cell on one gateway: CPU-seconds of the gateway and the emulator over n requests."""
    cell = Cell(gateway.name, 0, conc)
    before: dict[str, float] = {}

    def sample() -> dict[str, float]:
        return {s.name: sum(cpu_s(p) for p in s.pids()) for s in (gateway, emulator)}

    def warmed() -> None:
        before.update(sample())

    asyncio.run(drive_requests(gateway_flow(gateway.url, fmt), png, expect, conc, n, cell, warmed))
    after = sample()
    cell.cpu_s = {
        "gateway": after[gateway.name] - before[gateway.name],
        "emulator": after[emulator.name] - before[emulator.name],
    }
    return cell


def per_request_ms(cells: list[Cell], process: str = "gateway") -> float:
    done = sum(len(c.latencies) for c in cells)
    return sum(c.cpu_s[process] for c in cells) / done * 1000 if done else float("nan")


def report(
    runs: dict[tuple[str, str, int], list[Cell]], concurrencies: list[int], rounds: int
) -> None:
    print(
        f"\n{'gateway':8} {'format':8} {'conc':>4} {'n':>5} {'fail':>4} {'CPU ms/req':>10} "
        f"{'rounds min..max':>15} {'emu ms/req':>10} {'p50 ms':>7} {'req/s':>6}"
    )
    for fmt in FORMATS:
        for conc in concurrencies:
            for gw in GATEWAYS:
                cells = runs[(gw, fmt, conc)]
                each = [per_request_ms([c]) for c in cells]
                latencies = sorted(x for c in cells for x in c.latencies)
                p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
                done = sum(len(c.latencies) for c in cells)
                print(
                    f"{gw:8} {fmt:8} {conc:>4} {done:>5} {sum(c.failures for c in cells):>4} "
                    f"{per_request_ms(cells):10.2f} {min(each):7.2f}..{max(each):<6.2f} "
                    f"{per_request_ms(cells, 'emulator'):10.2f} {p50:7.1f} "
                    f"{done / sum(c.seconds for c in cells):6.1f}"
                )
    print(f"\n{'format':8} {'conc':>4} {'current/baseline':>16} {'rounds min..max':>15}")
    ratios = []
    for fmt in FORMATS:
        for conc in concurrencies:
            base, cur = runs[("baseline", fmt, conc)], runs[("current", fmt, conc)]
            ratio = per_request_ms(cur) / per_request_ms(base)
            each = [
                per_request_ms([c]) / per_request_ms([b]) for b, c in zip(base, cur, strict=True)
            ]
            ratios.append(ratio)
            print(f"{fmt:8} {conc:>4} {ratio:16.3f} {min(each):7.3f}..{max(each):<7.3f}")
    overall = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"\nCPU per upscale request, current / baseline (geometric mean of the {len(ratios)} "
        f"cells): {overall:.3f} ({(overall - 1) * 100:+.1f} %; the target is within 5 %)"
    )
    print(
        f"Note: gateway utime+stime from /proc/<pid>/stat over each cell's requests (warm-up"
        f" excluded), pooled over {rounds} rounds; 'rounds min..max' is the spread of the"
        " per-round figures, a guide to how much of a difference is noise. The emulator's"
        " CPU per request is the control: equal columns mean both gateways saw the same load."
    )


def run(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway", "adapters"],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    with (
        tempfile.TemporaryDirectory() as tmp_name,
        baseline_tree(args.baseline) as tree,
        ExitStack() as stack,
    ):
        tmp = Path(tmp_name)
        faults = '{"latency_ms": 0, "jitter_ms": 0}'
        emulator = stack.enter_context(
            spawn(
                "emulator",
                ["-m", "adapters.emulators", "fal", "--port", "{port}", "--key", KEY,
                 "--faults", faults],
                "/_emulator/faults",
                {"BENCH_TMP": str(tmp)},
            )
        )  # fmt: skip
        print(
            f"baseline {args.baseline} (worktree {tree}); current: working tree at {head}"
            f" ({len(dirty)} uncommitted files under gateway/ and adapters/)"
        )
        gateways = {
            "baseline": start_gateway_from(stack, "baseline", tmp / "baseline", emulator.url, tree),
            "current": start_gateway_from(stack, "current", tmp / "current", emulator.url, ROOT),
        }
        png = sample_png(args.size)
        expect = len(_native_output(emulator, png))
        print(
            f"{args.size}x{args.size} PNG, {len(png) / 1024:.0f} KiB in, {expect / 1024:.0f} KiB"
            f" out (emulator x{NATIVE}, 0 ms); {args.rounds} rounds x {args.requests} requests"
            f" per cell and gateway; {os.cpu_count()} cores shared by all processes"
        )
        for gw in gateways.values():  # first-request costs (imports, pools) out of round 1
            for fmt in FORMATS:
                measure(gw, emulator, fmt, png, expect, 4, 20)
        runs: dict[tuple[str, str, int], list[Cell]] = {}
        began = time.perf_counter()
        for round_no in range(args.rounds):
            turn = GATEWAYS[round_no % 2 :] + GATEWAYS[: round_no % 2]
            for fmt in FORMATS:
                for conc in concurrencies:
                    for gw in turn:
                        cell = measure(
                            gateways[gw], emulator, fmt, png, expect, conc, args.requests
                        )
                        runs.setdefault((gw, fmt, conc), []).append(cell)
            print(f"  round {round_no + 1}/{args.rounds} done, {time.perf_counter() - began:.0f} s")
        report(runs, concurrencies, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.framework", description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100, help="per cell, gateway and round")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--size", type=int, default=512, help="side of the uploaded PNG")
    parser.add_argument("--baseline", default=BASELINE, help="git commit of the baseline")
    args = parser.parse_args()
    try:
        run(args)
    except Exception:  # a measurement: report what went wrong, never fail the bench target
        traceback.print_exc()
        print("bench.framework: no figures (see the error above)", file=sys.stderr)


if __name__ == "__main__":
    main()
