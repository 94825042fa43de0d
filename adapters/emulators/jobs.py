"""State both emulators share: jobs run as asyncio tasks, result files, recorded requests,
counters, the bill and the fault dice. Bounded: old jobs and files are evicted (the bill's
running total is not).

Billing: a job is billed, at the emulator's price, iff it ends `succeeded`, whether or not a
fault spoiled what it returns (malformed, truncated, empty_output); and, in an emulator whose
state says `bill_canceled_running` (Replicate's), iff it ends `canceled` after it started
running, by a cancel request or its deadline, at the full price: Replicate bills a canceled
prediction (not an aborted one), and its `started_at` shows the gateway which those are.
Failed and aborted jobs, jobs cancelled before they started, fal's cancelled jobs and jobs
the emulator stops itself (evicted, or at shutdown) cost nothing, and a submit that was
never answered is no job at all."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from adapters.emulators.config import EmulatorConfig
from adapters.emulators.faults import FaultDice
from adapters.emulators.imagework import InputInvalid, Output, upscale

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
MICROS = 1_000_000


@dataclass(slots=True)
class Job:
    id: str
    fault: str | None
    price_micros: int = 0  # what it bills if it succeeds
    billed: bool = False
    created_at: float = field(default_factory=time.time)
    state: str = "queued"  # queued | running | succeeded | failed | canceled | aborted
    started_at: float | None = None
    completed_at: float | None = None
    output: Output | None = None
    file_name: str | None = None
    error: str | None = None
    error_kind: str | None = None  # invalid | policy | model | timeout
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    work: asyncio.Task[Output] | None = None  # the image work, started with the service time
    deadline_at: float | None = None  # epoch seconds; it is stopped then if still unfinished
    deadline_timer: asyncio.TimerHandle | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


class EmulatorState:
    def __init__(
        self,
        config: EmulatorConfig,
        default_format: str,
        default_price_usd: float,
        bill_canceled_running: bool = False,
    ):
        self.config = config
        self.bill_canceled_running = bill_canceled_running
        self.output_format = config.output_format or default_format
        price = default_price_usd if config.price_usd is None else config.price_usd
        self.price_micros = round(price * MICROS)
        self.billed_micros = 0  # every billed job since start, evicted ones included
        self.hanging = 0  # submits held by the hang fault: they may still become jobs
        self.dice = FaultDice(config.faults)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.files: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.requests: deque[dict[str, Any]] = deque(maxlen=1000)
        self.stats: Counter[str] = Counter()

    def key_ok(self, presented: str | None) -> bool:
        if not presented:
            return False
        expected = self.config.api_key
        return expected is None or secrets.compare_digest(presented, expected)

    def base_url(self, request_base: str) -> str:
        return (self.config.public_url or request_base).rstrip("/")

    def new_job(self, fault: str | None) -> Job:
        job = Job(id=secrets.token_hex(8), fault=fault, price_micros=self.price_micros)
        self.jobs[job.id] = job
        excess = len(self.jobs) - self.config.max_jobs
        if excess > 0:
            # The oldest finished jobs go; a job still running is some client's, kept.
            for old in [j.id for j in self.jobs.values() if j.finished][:excess]:
                del self.jobs[old]
        self.stats["submitted"] += 1
        return job

    async def hang(self, request: Request) -> bool:
        """The hang fault: no answer for hang_s. True when the client is still there to be
        answered; a client that gave up meanwhile submitted no job (and is not billed)."""
        self.hanging += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.dice.script.hang_s
            while (left := deadline - loop.time()) > 0:
                # Polled, so a hang whose client left ends now rather than in hang_s.
                await asyncio.sleep(min(0.2, left))
                if await request.is_disconnected():
                    return False
            return not await request.is_disconnected()
        finally:
            self.hanging -= 1

    def put_file(self, name: str, data: bytes, content_type: str) -> None:
        self.files[name] = (data, content_type)
        while len(self.files) > self.config.max_jobs:
            self.files.popitem(last=False)

    async def start(
        self,
        job: Job,
        load_input: Callable[[], Awaitable[bytes]],
        start_timeout_s: float | None = None,
        deadline_s: float | None = None,
    ) -> None:
        """Run the job. `start_timeout_s`: aborted if it would not start within that (fal's
        request timeout). `deadline_s`: counted from its creation, it is then aborted if it
        has not started and cancelled if it is running (Replicate's Cancel-After)."""
        if deadline_s is not None:
            job.deadline_at = job.created_at + deadline_s
            job.deadline_timer = asyncio.get_running_loop().call_later(
                max(0.0, job.deadline_at - time.time()), self._deadline_reached, job
            )
        latency = self.dice.latency_s()
        job.task = asyncio.create_task(self._run(job, load_input, start_timeout_s, latency))
        if latency == 0:
            # No service time: the job is finished when its submit is answered, as with an
            # instant model (otherwise the first status poll races a thread hop).
            await job.done.wait()

    async def _run(
        self,
        job: Job,
        load_input: Callable[[], Awaitable[bytes]],
        start_timeout_s: float | None,
        latency: float,
    ) -> None:
        queued = latency * 0.3  # part of the service time is spent in the queue
        output: asyncio.Task[Output] | None = None
        try:
            if start_timeout_s is not None and queued > start_timeout_s:
                await asyncio.sleep(start_timeout_s)
                self._finish(job, "aborted", "timeout", "request did not start before its timeout")
                return
            if job.fault not in ("job_failure", "content_policy", "empty_output"):
                # The model's work overlaps the service time, as a real worker's does: a
                # burst of jobs that end together does not pile its image work up at the end.
                job.work = output = asyncio.create_task(self._output(job, load_input))
            await asyncio.sleep(queued)
            job.state, job.started_at = "running", time.time()
            await asyncio.sleep(latency - queued)
            if job.fault == "job_failure":
                self._finish(job, "failed", "model", "model crashed: CUDA error: out of memory")
            elif job.fault == "content_policy":
                self._finish(job, "failed", "policy", "NSFW content detected: content policy")
            elif job.fault == "empty_output":
                self._finish(job, "succeeded")
            else:
                assert output is not None
                job.output = await output
                self._finish(job, "succeeded")
        except InputInvalid as exc:
            self._finish(job, "failed", "invalid", str(exc))
        except asyncio.CancelledError:
            # A cancel request or a deadline has finished the job already; reaching here
            # unfinished means the emulator stopped it (eviction, shutdown): nobody's bill.
            self._finish(job, "canceled", billable=False)
            raise
        except Exception as exc:  # a job must always end, or clients poll it forever
            self._finish(job, "failed", "model", f"internal error: {type(exc).__name__}")
        finally:
            if output is not None:
                output.cancel()  # the job ended another way: its work is nobody's
                output.add_done_callback(_retrieved)

    async def _output(self, job: Job, load_input: Callable[[], Awaitable[bytes]]) -> Output:
        data = await load_input()
        # Which input a job billed for: drills count completed jobs per request.
        job.extra["input_sha256"] = hashlib.sha256(data).hexdigest()[:16]
        config = self.config
        return await asyncio.to_thread(
            upscale, data, config.native_factor, config.max_output_side, self.output_format
        )

    def _deadline_reached(self, job: Job) -> None:
        if job.finished:
            return
        if job.task and not job.task.done():
            job.task.cancel()
        if job.state == "queued":
            self._finish(job, "aborted", "timeout", "prediction did not start before its deadline")
        else:
            self._finish(job, "canceled", "timeout")

    def _finish(
        self,
        job: Job,
        state: str,
        kind: str | None = None,
        error: str | None = None,
        *,
        billable: bool = True,
    ) -> None:
        if job.finished:
            return
        if job.deadline_timer is not None:
            job.deadline_timer.cancel()
        job.state, job.error_kind, job.error = state, kind, error
        job.completed_at = time.time()
        ran = job.started_at is not None
        if billable and (
            state == "succeeded" or (state == "canceled" and ran and self.bill_canceled_running)
        ):
            job.billed = True
            self.billed_micros += job.price_micros
        if job.output is not None:
            job.file_name = f"{job.id}.{job.output.extension}"
            self.put_file(job.file_name, job.output.data, job.output.content_type)
        self.stats[state] += 1
        job.done.set()

    def cancel(self, job: Job) -> bool:
        if job.finished:
            return False
        if job.task and not job.task.done():
            job.task.cancel()
        self._finish(job, "canceled")
        return True

    def file_bytes(self, name: str) -> tuple[bytes, str] | None:
        found = self.files.get(name)
        if found is None:
            return None
        data, content_type = found
        job = self.jobs.get(name.split(".")[0])
        self.stats["files_served"] += 1
        if job is not None and job.fault == "truncated":
            return data[: len(data) // 2], content_type
        return found

    def file_response(self, name: str) -> Response | None:
        found = self.file_bytes(name)
        if found is None:
            return None
        data, content_type = found
        job = self.jobs.get(name.split(".")[0])
        if job is not None and job.fault == "slow_download":
            rate = self.dice.script.download_bytes_per_s
            return StreamingResponse(
                _trickle(data, rate),
                media_type=content_type,
                headers={"content-length": str(len(data))},
            )
        return Response(data, media_type=content_type)

    async def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.deadline_timer is not None:
                job.deadline_timer.cancel()
        tasks = [t for j in self.jobs.values() for t in (j.task, j.work) if t and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _trickle(data: bytes, bytes_per_s: float) -> AsyncIterator[bytes]:
    step = max(1024, int(bytes_per_s / 10))  # ten chunks a second
    for start in range(0, len(data), step):
        yield data[start : start + step]
        await asyncio.sleep(0.1)


def summarize_image(value: Any) -> Any:
    """What the admin route shows of an image input: never the bytes themselves."""
    if isinstance(value, str) and value.startswith("data:"):
        head, _, payload = value.partition(",")
        size = len(payload) * 3 // 4 - payload[-2:].count("=")  # base64 padding is no byte
        return {"kind": "data_uri", "bytes": size, "mime": head[5:].split(";")[0]}
    if isinstance(value, str):
        return {"kind": "url", "url": value[:300]}
    return value


def _retrieved(task: asyncio.Task[Any]) -> None:
    """An input that failed to load for a job that had already ended: nothing to report."""
    if not task.cancelled():
        task.exception()
