"""`python -m reliability` (`make reliability`): the bad-input suite at full size, the fault
drills, then the soak, and one table of what they found.

    --bad-inputs-per-generator 2500   hypothesis examples per generator (4 generators)
    --requests 60 --concurrency 8     per drill
    --soak 600                        seconds at --soak-concurrency 32 (0: skip)
    --schema-examples 400             schemathesis cases per operation, fresh seed (0: skip)
    --no-edge                         skip the connection-level attacks (reliability/edge.py)
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

import tests.integration.netguard as netguard
from reliability.drills import DRILLS, DrillResult, run_drill
from reliability.edge import print_edge, run_edge_suite
from reliability.recovery import RecoveryResult, measure_recovery
from reliability.soak import SoakResult, soak, still_serving
from reliability.stack import stack
from tests.integration.reconcile import Reconciliation, usd
from tests.integration.servers import ROOT

# Drill stack: fast takeover of a dead replica's claims; the cache off, so every request
# reaches the providers and double charges are the gateway's alone to prevent.
DRILL_CONFIG = {"cache": {"enabled": False}, "idempotency": {"lease_s": 3}}


def bad_inputs(per_generator: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bad-inputs.json"
        env = {
            **os.environ,
            "RELIABILITY_EXAMPLES": str(per_generator),
            "RELIABILITY_REPORT": str(report),
        }
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        print(done.stdout[-1500:], flush=True)
        found: dict[str, object] = orjson.loads(report.read_bytes()) if report.exists() else {}
        found["passed"] = done.returncode == 0
        return found


def schema_contract(examples: int) -> bool:
    """schemathesis, every operation and check, many more cases than `make test` runs and a
    fresh seed each time (tests/integration/test_openapi_contract.py)."""
    env = {**os.environ, "SCHEMATHESIS_EXAMPLES": str(examples), "SCHEMATHESIS_SEED": "random"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/integration/test_openapi_contract.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    print(done.stdout[-3000:], flush=True)
    return done.returncode == 0


def bill_cells(bills: Reconciliation) -> str:
    """ledger USD | billed USD | difference | metrics USD: the table's money columns."""
    spoiled = sum(sum(f.spoiled_billed.values()) for f in bills.figures.values())
    billed = usd(bills.billed_micros) + (f" ({spoiled} spoiled)" if spoiled else "")
    difference = usd(bills.difference_micros) + ("" if bills.ok else " FAIL")
    return f"{usd(bills.ledger_micros)} | {billed} | {difference} | {usd(bills.metrics_micros)}"


def print_bill_problems(name: str, bills: Reconciliation) -> None:
    for line in bills.failures:
        print(f"|   {name}: {line} |")
    for note in bills.notes:
        print(f"|   {name}: note: {note} |")


def print_drills(results: list[DrillResult]) -> None:
    print(
        "\n| drill | requests | ok | lost | failed, every provider faulted | double charges "
        "| ledger USD | billed USD | difference | metrics USD | 5xx seen | p50 | p99 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.name} | {r.requests} | {r.ok} | {r.lost} | {r.excused} | "
            f"{r.double_charged} | {bill_cells(r.bills)} | {r.server_errors} | "
            f"{r.p50_s:.2f} s | {r.p99_s:.2f} s |"
        )
        if r.errors:
            print(f"|   errors: {dict(r.errors)} |")
        print_bill_problems(r.name, r.bills)
    print(
        "(ledger: what the gateways' ledger gained; billed: what the emulators billed, "
        "spoiled outputs included; metrics: upscale_spend_usd gained over the replicas, n/a "
        "when one was killed or stopped)"
    )


def print_soak(result: SoakResult) -> None:
    rate = result.requests / result.seconds
    print(
        f"\nsoak: {result.seconds:.0f} s at concurrency {result.concurrency}, mixed faults on "
        f"both providers: {result.requests} requests ({rate:.1f}/s), {result.ok} ok, "
        f"{result.excused} failed where every provider tried had a fault, "
        f"{result.unexplained} unexplained, {result.double_charged} double charges, "
        f"p99 {result.p99_s:.2f} s"
    )
    if result.bills is not None:
        print(f"ledger USD | billed USD | difference | metrics USD: {bill_cells(result.bills)}")
        print_bill_problems("soak", result.bills)
    settled = result.rss_mib[len(result.rss_mib) // 5]
    print(
        f"gateway RSS {result.rss_mib[0]:.0f} MiB at start, {settled:.0f} MiB after warm-up, "
        f"{result.rss_mib[-1]:.0f} MiB at the end ({result.rss_growth:+.1%}); open files "
        f"{result.fds[0]} at start, {result.fds_settled} after warm-up, {result.fds[-1]} at the "
        "end"
    )
    if result.errors:
        print(f"errors: {dict(result.errors)}")


def print_recovery(result: RecoveryResult) -> None:
    took = "never (within the drill)" if result.recovery_s is None else f"{result.recovery_s:.1f} s"
    print(
        f"\nrecovery: fal failed for {result.fail_s:.0f} s under {result.concurrency} requests "
        f"in flight on 3 replicas; fal carried >= 90 % of traffic again {took} after it "
        f"recovered (target: open_base_s + 2 = {result.target_s:.1f} s: "
        f"{'met' if result.met else 'MISSED'}); breaker opened {result.opened}x, highest "
        f"opened_count {result.max_opened_count}, longest backoff {result.max_backoff_s:.1f} s; "
        f"{result.ok} of {result.requests} requests served"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bad-inputs-per-generator", type=int, default=2500)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--soak", type=float, default=600)
    parser.add_argument("--soak-concurrency", type=int, default=32)
    parser.add_argument("--schema-examples", type=int, default=400)
    parser.add_argument("--no-edge", action="store_true")
    parser.add_argument("--only", default="", help="run only drills whose name has this")
    args = parser.parse_args()
    netguard.install()
    # The emulators run in this process: their hung jobs, cancelled at shutdown by design,
    # would otherwise print tracebacks between the tables.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    started = time.monotonic()

    found = bad_inputs(args.bad_inputs_per_generator) if args.bad_inputs_per_generator else {}
    schema_ok = schema_contract(args.schema_examples) if args.schema_examples else None
    edge = []
    if not args.no_edge:
        with tempfile.TemporaryDirectory() as tmp:
            edge = run_edge_suite(Path(tmp))
    results: list[DrillResult] = []
    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp), 3, **DRILL_CONFIG) as running:
        for drill in DRILLS:
            if args.only and args.only not in drill.name:
                continue
            results.append(run_drill(running, drill, args.requests, args.concurrency))
            print(f"drill done: {drill.name}", flush=True)
        recovered = measure_recovery(running) if not args.only else None
    soaked = None
    if args.soak > 0:
        with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp), 1, **DRILL_CONFIG) as running:
            soaked = soak(running, args.soak, args.soak_concurrency)
            serving = still_serving(running)

    if edge:
        print_edge(edge)
    print_drills(results)
    if recovered is not None:
        print_recovery(recovered)
    if soaked is not None:
        print_soak(soaked)
    statuses = found.get("statuses", {})
    input_5xx = sum(n for s, n in statuses.items() if str(s)[:1] == "5")  # type: ignore[union-attr]
    lost = sum(r.lost for r in results) + (soaked.unexplained if soaked else 0)
    doubles = sum(r.double_charged for r in results) + (soaked.double_charged if soaked else 0)
    survived = sum(1 for r in results if r.lost == 0 and r.double_charged == 0 and r.bills.ok)
    bills = [r.bills for r in results] + ([soaked.bills] if soaked and soaked.bills else [])
    unreconciled = sum(1 for b in bills if not b.ok)
    load = (
        f"{soaked.requests} requests in {soaked.seconds:.0f} s at c{soaked.concurrency}"
        + ("" if serving else " (a replica stopped answering!)")
        if soaked
        else "soak skipped"
    )
    steady = (
        f"RSS {soaked.rss_growth:+.1%}, open files {soaked.fds_settled} -> {soaked.fds[-1]}"
        + ("" if soaked.flat else " (growing!)")
        if soaked
        else "n/a"
    )
    print(
        "\n| load held | faults survived | bad inputs tried | 5xx caused by input | "
        "requests lost | double charges | ledger = bills | soak after warm-up |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {load} | {survived} of {len(results)} drills | {found.get('bad_inputs_tried', 0)} | "
        f"{input_5xx} | {lost} | {doubles} | {len(bills) - unreconciled} of {len(bills)} "
        f"runs | {steady} |"
    )
    if schema_ok is not None:
        print(
            f"\nschemathesis, {args.schema_examples} cases per operation, every check: "
            + ("nothing found" if schema_ok else "PROBLEMS FOUND (output above)")
        )
    print(f"\n(in {time.monotonic() - started:.0f} s)")
    flat = soaked is None or soaked.flat
    ok = (
        lost == 0
        and doubles == 0
        and unreconciled == 0
        and input_5xx == 0
        and flat
        and (recovered is None or recovered.met)
        and found.get("passed", True)
        and schema_ok is not False
        and all(r.held for r in edge)
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
