"""When to poll a job first: after most of the time the provider says jobs of the same size
spent running, instead of from the first tenth of a second.

Polling on the fixed schedule (0.1 s, growing 1.5x to 1 s) costs a 10 s job about 15 status
calls; with a thousand jobs in flight that is a quarter of the event loop. The wait is
learned from the run times the provider reports for its succeeded jobs (fal's
`metrics.inference_time`, Replicate's `metrics.predict_time`), so it errs short, never long:
- a job cannot end before it has run, and the run time excludes the time queued, so a
  backed-up queue, a batch's low-priority lines or our own polling never lengthen it;
- only jobs of exactly the same input size count (the same size is the same work), and none
  until `MIN_SEEN` of them succeeded in the last `MAX_AGE_S`;
- a reported run time longer than the job existed (a unit mistake, a hostile value) counts
  as the time it existed;
- it is `SHARE` of a low quantile of those run times, and at most a quarter of the time the
  request has left, so a late poll still leaves time to fetch the result.
After the wait the fixed schedule starts over, polling at least as often as it would have by
then. What waits longer: a job that fails early (a refusal, the provider's own error) is
found at the end of the wait, at most `SHARE` of the run time of its size.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

MIN_SEEN = 5  # succeeded jobs of a size before its wait is learned
KEEP = 16  # run times kept per size: the last few minutes of a busy provider
SIZES = 256  # sizes remembered, least recently seen dropped first
SHARE = 0.9
QUANTILE = 0.2
DEADLINE_SHARE = 0.25
MAX_AGE_S = 600.0  # a size not seen for this long is learned again


class JobPace:
    def __init__(self) -> None:
        # size -> (when it was seen, seconds it ran), newest last
        self._runs: OrderedDict[tuple[int, int], deque[tuple[float, float]]] = OrderedDict()

    def first_wait(self, size: tuple[int, int], left_s: float, now: float | None = None) -> float:
        """Seconds from the submit to the first status poll of a job on an input of `size`
        (width, height) with `left_s` seconds left to its deadline; 0: poll now."""
        since = (time.monotonic() if now is None else now) - MAX_AGE_S
        recent = sorted(s for when, s in self._runs.get(size, ()) if when >= since)
        if len(recent) < MIN_SEEN:
            return 0.0
        low = recent[int(QUANTILE * (len(recent) - 1))]
        return max(0.0, min(SHARE * low, DEADLINE_SHARE * left_s))

    def ran(
        self, size: tuple[int, int], seconds: object, existed: float, now: float | None = None
    ) -> None:
        """A job on an input of `size`, submitted `existed` seconds ago, succeeded after
        running `seconds` as the provider reported it (anything but a non-negative number
        is ignored)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return
        if not 0 <= seconds < 3600:
            return
        seconds = min(seconds, max(0.0, existed))
        runs = self._runs.get(size)
        if runs is None:
            runs = self._runs[size] = deque(maxlen=KEEP)
            if len(self._runs) > SIZES:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(size)
        runs.append((time.monotonic() if now is None else now, float(seconds)))


def run_time(body: object, key: str) -> object:
    """`body["metrics"][key]`, or None: what a provider reported a job ran for."""
    metrics = body.get("metrics") if isinstance(body, dict) else None
    return metrics.get(key) if isinstance(metrics, dict) else None
