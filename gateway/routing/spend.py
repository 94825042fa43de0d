"""What one request's provider jobs cost, as the providers bill them.

Providers bill jobs, not attempts: a job that succeeded bills even when its output proves
unusable (spoiled) or when the request no longer wants it (a hedge's loser, a sibling of a
failed image, a job abandoned at the deadline but finished before the cancel landed). The
adapters report each billed job (`adapters.base.Billing`); the router tags it with the
attempt's price and its fate; the request's bill settles once every follow-up has ended, so
the ledger holds every dollar the providers bill, once per job."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# An attempt's fate, which names the kind of each job it billed.
RUNNING, SERVED, SPOILED, ABANDONED = "running", "served", "spoiled", "abandoned"


@dataclass(slots=True)
class AttemptBilling:
    """The `Billing` an adapter reports to for one attempt: its jobs cost its price."""

    spend: Spend
    price_usd: float
    fate: str = RUNNING
    charged: bool = False  # some job of this attempt billed
    following: int = 0  # its follow-ups still running (each may yet find a charge)

    def billed(self, provider: str, job_id: str) -> None:
        self.charged = True
        self.spend.add(Charge(provider, job_id, self.price_usd, self))

    def pending(self, task: asyncio.Future[Any]) -> None:
        self.following += 1
        task.add_done_callback(self._followed)
        self.spend.pending(task)

    def _followed(self, _: asyncio.Future[Any]) -> None:
        self.following -= 1

    @property
    def may_bill(self) -> bool:
        """Not billed yet, and still able to be: running, or a follow-up still asks."""
        return not self.charged and (self.fate == RUNNING or self.following > 0)


@dataclass(slots=True)
class Charge:
    provider: str
    job_id: str
    usd: float
    attempt: AttemptBilling

    @property
    def kind(self) -> str:
        """served, spoiled or abandoned (an attempt still running when asked is abandoned:
        the request has ended without its image)."""
        return ABANDONED if self.attempt.fate == RUNNING else self.attempt.fate


@dataclass(slots=True)
class Spend:
    charges: list[Charge] = field(default_factory=list)
    # Called with what the request may bill once one more attempt starts (its `exposure`
    # plus that attempt's price): raises if the request's budget hold cannot cover it.
    guard: Callable[[float], Awaitable[None]] | None = None
    _attempts: list[AttemptBilling] = field(default_factory=list)
    _jobs: set[tuple[str, str]] = field(default_factory=set)
    _pending: set[asyncio.Future[Any]] = field(default_factory=set)

    def attempt(self, price_usd: float) -> AttemptBilling:
        attempt = AttemptBilling(self, price_usd)
        self._attempts.append(attempt)
        return attempt

    @property
    def exposure(self) -> float:
        """What the request may bill at most by now: its charges, and the price of every
        attempt that may still bill."""
        return self.usd + sum(a.price_usd for a in self._attempts if a.may_bill)

    async def allow(self, price_usd: float) -> None:
        """Before an attempt at `price_usd` starts: the hold must cover it (see `guard`)."""
        if self.guard is not None:
            await self.guard(self.exposure + price_usd)

    def add(self, charge: Charge) -> None:
        job = (charge.provider, charge.job_id)
        if job not in self._jobs:  # a job is reported where it is seen billed: count it once
            self._jobs.add(job)
            self.charges.append(charge)

    def pending(self, task: asyncio.Future[Any]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @property
    def usd(self) -> float:
        return sum(c.usd for c in self.charges)

    @property
    def unsettled(self) -> bool:
        return bool(self._pending)

    async def settled(self, timeout_s: float) -> bool:
        """Wait for the follow-ups that may still report a charge; False if some outlast
        `timeout_s` (their charges come later)."""
        if not self._pending:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._pending:
                    await asyncio.wait(set(self._pending))
        return not self._pending
