"""The invariant "ledger = providers' bills" (DESIGN.md, "Invariants every scenario, drill and
soak checks"), checked over one scenario:

- per provider, the micro-USD the gateways' ledgers gained equals what the emulators billed
  in the same window (a job is billed iff it ended `succeeded`, spoiled outputs included,
  or, on Replicate, ended `canceled` after it had started running; a running fal job that
  is cancelled goes on, and bills if it succeeds);
- `upscale_spend_usd` gained, summed over the scenario's gateway processes, equals the
  ledger (n/a when a process exited, which takes its in-process counters with it, or runs
  several workers, whose counters no one answer has).

Gateways on one Redis URL and key prefix share one ledger, counted once; a gateway without
Redis has its own. Only gateways whose provider URLs name the given emulators count.

    before = snapshot({"fal": fal, "replicate": replicate})
    ...  # the scenario
    check(before, {"fal": fal, "replicate": replicate}).assert_ok()

`check` first waits for quiescence: no emulator job queued or running, no submit held in a
hang, and every ledger unchanged for `quiet_s` (bounded by `timeout_s`; not reaching it is
itself a failure: provider work outlived the scenario)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from tests.integration.servers import STARTED, GatewayProcess

MICROS = 1_000_000
PROVIDERS = ("fal", "replicate")
# Faults after which a job still succeeds, and bills, but its output cannot be used.
SPOILING = frozenset({"malformed", "truncated", "empty_output"})
StoreKey = tuple[str, ...]
# Ledgers first seen after a scenario began start from what the last check saw of them
# (a Redis key space outlives its gateways); a new key space starts from nothing.
_last_seen: dict[StoreKey, dict[str, int]] = {}


class EmulatorLike(Protocol):
    url: str


def emulator_jobs(emulator: EmulatorLike) -> dict[str, Any]:
    # A sandbox gateway's own emulators take its sandbox key (gateway/sandbox.py).
    key = getattr(emulator, "admin_key", None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{emulator.url}/_emulator/jobs", headers=headers, timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def label(key: StoreKey) -> str:
    """A ledger's name: `redis <url> <prefix>`, or `memory <gateway url>`."""
    return " ".join(key[:2] if key[0] == "memory" else key)


def usd(micros: int | None) -> str:
    return "n/a" if micros is None else f"{micros / MICROS:.6f}"


@dataclass(slots=True)
class Snapshot:
    at: float
    started_index: int  # len(STARTED) when taken: later ones are new in the scenario
    gateways: list[GatewayProcess]
    billed: dict[str, int]  # provider -> emulator billed_micros (running total)
    job_ids: dict[str, set[str]]
    unfinished: dict[str, list[str]]  # jobs queued/running when it was taken
    ledgers: dict[StoreKey, dict[str, int]]  # store -> provider -> micros
    unreadable: dict[StoreKey, str]
    metrics: dict[int, dict[str, int]]  # id(gateway) -> provider -> micros


@dataclass(slots=True)
class Figures:
    provider: str
    ledger: int = 0  # micro-USD the ledgers gained
    billed: int = 0  # micro-USD the emulator billed
    metrics: int | None = 0  # micro-USD upscale_spend_usd gained (None: n/a)
    jobs: int = 0  # jobs created in the window
    # micro-USD of billed jobs no gateway lived to learn of (a replica killed between the
    # provider's accept and its journal write), which the caller proved job by job
    # (reliability/drills.py): the ledger cannot hold them
    unknown: int = 0
    billed_jobs: int = 0
    spoiled_billed: Counter[str] = field(default_factory=Counter)  # fault -> billed jobs
    states: Counter[str] = field(default_factory=Counter)

    @property
    def difference(self) -> int:
        return self.ledger - self.billed

    @property
    def balanced(self) -> bool:
        return self.ledger + self.unknown == self.billed


@dataclass(slots=True)
class Reconciliation:
    figures: dict[str, Figures]
    stores: list[StoreKey]
    problems: list[str] = field(default_factory=list)  # each one fails the check
    notes: list[str] = field(default_factory=list)
    ledger_na: str = ""  # why the ledgers' gain is not known (a ledger was unreadable)
    metrics_na: str = ""  # why metrics are not compared, if they are not

    @property
    def ledger_micros(self) -> int | None:
        return None if self.ledger_na else sum(f.ledger for f in self.figures.values())

    @property
    def billed_micros(self) -> int:
        return sum(f.billed for f in self.figures.values())

    @property
    def metrics_micros(self) -> int | None:
        if self.metrics_na:
            return None
        return sum(f.metrics or 0 for f in self.figures.values())

    @property
    def difference_micros(self) -> int | None:
        ledger = self.ledger_micros
        return None if ledger is None else ledger - self.billed_micros

    @property
    def failures(self) -> list[str]:
        out = list(self.problems)
        for f in self.figures.values():
            if not self.ledger_na and not f.balanced:
                unknown = f" + {usd(f.unknown)} USD no gateway knew of" if f.unknown else ""
                out.append(
                    f"{f.provider}: ledger {usd(f.ledger)} USD{unknown} != billed "
                    f"{usd(f.billed)} USD (difference {usd(f.difference)} USD)"
                )
            if not (self.ledger_na or self.metrics_na) and f.metrics != f.ledger:
                out.append(
                    f"{f.provider}: upscale_spend_usd {usd(f.metrics)} USD != ledger "
                    f"{usd(f.ledger)} USD"
                )
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [
            "provider   | ledger USD | billed USD | ledger-billed | metrics USD | jobs | billed "
            "jobs (spoiled) | job states"
        ]
        for f in self.figures.values():
            spoiled = ", ".join(f"{n} {k}" for k, n in sorted(f.spoiled_billed.items()))
            ledger = None if self.ledger_na else f.ledger
            difference = None if self.ledger_na else f.difference
            metrics = None if self.metrics_na else f.metrics
            lines.append(
                f"{f.provider:<10} | {usd(ledger):>10} | {usd(f.billed):>10} | "
                f"{usd(difference):>13} | {usd(metrics):>11} | {f.jobs:>4} | "
                f"{f.billed_jobs} ({spoiled or 'none'}) | {dict(f.states)}"
            )
        return "\n".join(lines)

    def message(self) -> str:
        parts = ["ledger = providers' bills does not hold:"]
        parts += [f"  - {line}" for line in self.failures]
        parts.append(self.table())
        if self.metrics_na:
            parts.append(f"metrics: n/a ({self.metrics_na})")
        parts.append(f"ledgers: {[label(k) for k in self.stores] or 'none'}")
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def assert_ok(self) -> Reconciliation:
        assert self.ok, self.message()
        return self


def _ours(gateway: GatewayProcess, emulators: Mapping[str, EmulatorLike]) -> bool:
    urls = gateway.provider_urls
    return any(urls.get(p) == e.url for p, e in emulators.items())


def scenario_gateways(
    emulators: Mapping[str, EmulatorLike], since: int = 0, also: Iterable[GatewayProcess] = ()
) -> list[GatewayProcess]:
    """Gateways on these emulators: alive ones, and any started since index `since`."""
    seen: dict[int, GatewayProcess] = {}
    for n, gateway in enumerate(STARTED):
        if (gateway.alive or n >= since) and _ours(gateway, emulators):
            seen[id(gateway)] = gateway
    for gateway in also:
        if _ours(gateway, emulators):
            seen[id(gateway)] = gateway
    return list(seen.values())


def _read_ledgers(
    gateways: Iterable[GatewayProcess], settled: list[bool] | None = None
) -> tuple[dict[StoreKey, dict[str, int]], dict[StoreKey, str]]:
    """Each store's ledger, read once through any live gateway that keeps it. `settled`, if
    given, gets one entry: whether every gateway answered that none of its bills may still
    add to its ledger (each replica of a shared ledger is asked)."""
    ledgers: dict[StoreKey, dict[str, int]] = {}
    unreadable: dict[StoreKey, str] = {}
    final = True
    for gateway in gateways:
        key = gateway.store_key
        if key in ledgers:
            if settled is not None and gateway.alive:
                try:  # several workers: one of them answers, the others may have bills open
                    final = final and gateway.workers == 1 and gateway.ledger_state()[1] == 0
                except (httpx.HTTPError, KeyError, ValueError):
                    final = False
            continue
        if not gateway.alive:
            unreadable.setdefault(key, "every gateway keeping it has exited")
            continue
        if gateway.admin_key is None:
            unreadable[key] = f"gateway {gateway.url} has no admin key"
            continue
        if gateway.workers > 1 and key[0] == "memory":
            unreadable[key] = (
                f"gateway {gateway.url} runs {gateway.workers} workers without Redis: each "
                "keeps its own ledger and any one answers /admin/spend"
            )
            continue
        try:
            ledgers[key], open_bills = gateway.ledger_state()
            unreadable.pop(key, None)
            final = final and open_bills == 0 and gateway.workers == 1
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            unreadable.setdefault(key, f"/admin/spend on {gateway.url}: {exc!r}"[:300])
    if settled is not None:
        settled.append(final and not unreadable)
    return ledgers, unreadable


def _read_metrics(gateways: Iterable[GatewayProcess]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for gateway in gateways:
        if gateway.alive and gateway.workers == 1:
            with contextlib.suppress(httpx.HTTPError):
                out[id(gateway)] = gateway.spend_metric_micros()
    return out


def snapshot(
    emulators: Mapping[str, EmulatorLike], gateways: Iterable[GatewayProcess] | None = None
) -> Snapshot:
    """What the ledgers, counters and emulators hold before a scenario. `gateways`: by
    default every live gateway on these emulators (servers.STARTED)."""
    chosen = scenario_gateways(emulators, len(STARTED), gateways or ())
    chosen = [g for g in chosen if g.alive] if gateways is None else chosen
    billed, ids, unfinished = {}, {}, {}
    for provider, emulator in emulators.items():
        body = emulator_jobs(emulator)
        billed[provider] = int(body["billed_micros"])
        ids[provider] = {j["id"] for j in body["jobs"]}
        unfinished[provider] = [
            j["id"] for j in body["jobs"] if j["state"] in ("queued", "running")
        ]
    ledgers, unreadable = _read_ledgers(chosen)
    for key, ledger in ledgers.items():
        _last_seen[key] = ledger
    return Snapshot(
        at=time.time(),
        started_index=len(STARTED),
        gateways=chosen,
        billed=billed,
        job_ids=ids,
        unfinished=unfinished,
        ledgers=ledgers,
        unreadable=unreadable,
        metrics=_read_metrics(chosen),
    )


def _busy(emulators: Mapping[str, EmulatorLike]) -> dict[str, list[str]]:
    busy: dict[str, list[str]] = {}
    for provider, emulator in emulators.items():
        body = emulator_jobs(emulator)
        pending = [
            f"{j['id']} {j['state']}" for j in body["jobs"] if j["state"] in ("queued", "running")
        ]
        if body.get("hanging"):
            pending.append(f"{body['hanging']} submit(s) held by the hang fault")
        if pending:
            busy[provider] = pending
    return busy


def quiesce(
    emulators: Mapping[str, EmulatorLike],
    gateways: list[GatewayProcess],
    quiet_s: float = 0.5,
    timeout_s: float = 15.0,
) -> dict[str, list[str]]:
    """Wait until no emulator job is queued or running and the ledgers are final: every
    gateway says none of its bills is open, or (where one cannot say: it exited, or runs
    several workers) the ledgers stood still for quiet_s; what is still busy at the
    providers when timeout_s runs out."""
    deadline = time.monotonic() + timeout_s
    last: dict[StoreKey, dict[str, int]] | None = None
    still_since = time.monotonic()
    while True:
        busy = _busy(emulators)
        settled: list[bool] = []
        ledgers, _ = _read_ledgers(gateways, settled)
        now = time.monotonic()
        if not busy and settled[0]:
            return {}
        if busy or ledgers != last:
            still_since = now
        last = ledgers
        if not busy and now - still_since >= quiet_s:
            return {}
        if now >= deadline:
            return busy
        time.sleep(0.1)


def check(
    before: Snapshot,
    emulators: Mapping[str, EmulatorLike],
    gateways: Iterable[GatewayProcess] | None = None,
    quiet_s: float = 0.5,
    timeout_s: float = 15.0,
) -> Reconciliation:
    """Reconcile the scenario since `before`: the ledgers' gain per provider against what
    the emulators billed meanwhile, and upscale_spend_usd's gain against the ledgers."""
    chosen = scenario_gateways(
        emulators, before.started_index, [*before.gateways, *(gateways or ())]
    )
    busy = quiesce(emulators, chosen, quiet_s, timeout_s)
    figures = {p: Figures(p) for p in emulators}
    result = Reconciliation(figures, sorted({g.store_key for g in chosen}))
    for provider, pending in busy.items():
        result.problems.append(
            f"{provider}: still busy {timeout_s:g} s after the scenario (provider work the "
            f"gateway left behind, billed or not later): {pending[:10]}"
        )
    for provider, unfinished in before.unfinished.items():
        if unfinished:
            result.notes.append(
                f"{provider} had {len(unfinished)} job(s) queued/running when the scenario "
                "began (the last one did not reach quiescence): its bill may land here"
            )

    # What the emulators billed: the running total's gain (exact whatever was evicted), and
    # per job, those created in the window.
    for provider, emulator in emulators.items():
        body = emulator_jobs(emulator)
        f = figures[provider]
        f.billed = int(body["billed_micros"]) - before.billed[provider]
        new_jobs = [j for j in body["jobs"] if j["id"] not in before.job_ids[provider]]
        f.jobs = len(new_jobs)
        by_id = 0
        for job in new_jobs:
            f.states[job["state"]] += 1
            if job.get("billed"):
                f.billed_jobs += 1
                by_id += int(job["price_micros"])
                if job["fault"] in SPOILING:
                    f.spoiled_billed[job["fault"]] += 1
        if by_id != f.billed:
            result.notes.append(
                f"{provider}: jobs created in the window billed {usd(by_id)} USD, the running "
                f"total gained {usd(f.billed)} USD (jobs from before it billed in it, or the "
                "emulator evicted some): the running total is compared"
            )

    # What the ledgers gained.
    ledgers, unreadable = _read_ledgers(chosen)
    lost = [f"{label(k)}: {why}" for k, why in unreadable.items() if k not in ledgers]
    lost += [
        f"{label(k)} (when it began): {why}"
        for k, why in before.unreadable.items()
        if k not in before.ledgers
    ]
    if lost:
        result.ledger_na = "; ".join(lost)
        result.problems += [f"ledger unreadable, {why}" for why in lost]
    for key, ledger in ledgers.items():
        start = before.ledgers.get(key)
        if start is None:
            start = _last_seen.get(key, {}) if key[0] == "redis" else {}
        _last_seen[key] = ledger
        # Which emulator a store's spend on a provider is on: its gateways' provider URL.
        urls = {g.provider_urls.get(p) for g in chosen if g.store_key == key for p in PROVIDERS}
        for provider in set(ledger) | set(start):
            gained = ledger.get(provider, 0) - start.get(provider, 0)
            if provider in figures:
                mine = {g.provider_urls.get(provider) for g in chosen if g.store_key == key}
                if emulators[provider].url in mine:
                    figures[provider].ledger += gained
                    continue
            if gained:
                result.problems.append(
                    f"ledger {label(key)} gained {usd(gained)} USD on '{provider}', which is "
                    f"none of the emulators checked ({sorted(u or 'sandbox' for u in urls)})"
                )

    # What upscale_spend_usd gained, over the scenario's processes.
    exited = [g.url for g in chosen if not g.alive]
    workers = [g.url for g in chosen if g.workers > 1]
    if exited:
        result.metrics_na = f"gateway(s) exited in the scenario, counters lost: {exited}"
    elif workers:
        result.metrics_na = f"several workers per process, counters split: {workers}"
    else:
        now = _read_metrics(chosen)
        missing = [g.url for g in chosen if id(g) not in now]
        if missing:
            result.metrics_na = f"/metrics unreadable on {missing}"
        for gateway in chosen:
            start = before.metrics.get(id(gateway), {})
            for provider, value in now.get(id(gateway), {}).items():
                gained = value - start.get(provider, 0)
                if provider in figures and gateway.provider_urls.get(provider) == (
                    emulators[provider].url
                ):
                    figures[provider].metrics = (figures[provider].metrics or 0) + gained
                elif gained:
                    result.problems.append(
                        f"{gateway.url}: upscale_spend_usd gained {usd(gained)} USD on "
                        f"'{provider}', which is none of the emulators checked"
                    )
    return result


def reconciled(
    before: Snapshot,
    emulators: Mapping[str, EmulatorLike],
    gateways: Iterable[GatewayProcess] | None = None,
) -> Reconciliation:
    """check(...).assert_ok(): an AssertionError listing per-provider figures if not."""
    return check(before, emulators, gateways).assert_ok()
