"""Benchmark timing core: interleaved A/B runs, median and spread, noisy-spread flags.

Standard library only: the DeepSparse worker (which runs in its own virtualenv without torch)
imports this module too, so both engines are timed by the same loop.

Why interleave: on a throttled, shared machine the clock speed drifts over tens of seconds. Timing
all dense runs and then all sparse runs would fold that drift into the ratio. Here every round runs
each variant once (order alternating between rounds) and the ratio is taken per round, so drift
that is slow compared with one round cancels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

NOISY_SPREAD = 0.10  # (p90 - p10) / median above this is flagged as noisy


@dataclass
class Summary:
    """Median and spread of repeated timings (seconds)."""

    n: int
    median: float
    min: float
    max: float
    p10: float
    p90: float
    spread: float  # (p90 - p10) / median: relative width of the middle 80 %
    noisy: bool

    def to_dict(self) -> dict:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of `values` (q in [0, 1])."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], noisy_spread: float = NOISY_SPREAD) -> Summary:
    """Median, min/max, p10/p90 and relative spread; `noisy` when the spread exceeds the threshold."""
    if not values:
        raise ValueError("no timings to summarise")
    med = statistics.median(values)
    p10, p90 = quantile(values, 0.10), quantile(values, 0.90)
    spread = (p90 - p10) / med if med > 0 else 0.0
    return Summary(
        n=len(values),
        median=med,
        min=min(values),
        max=max(values),
        p10=p10,
        p90=p90,
        spread=spread,
        noisy=spread > noisy_spread,
    )


@dataclass
class Interleaved:
    """Raw per-round timings of several variants run alternately."""

    times: dict[str, list[float]] = field(default_factory=dict)  # variant -> one median per round
    order: list[str] = field(default_factory=list)  # execution order, for audit/tests
    inner: dict[str, int] = field(default_factory=dict)  # calls per timed sample
    phases: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # variant -> phase -> per-round medians

    def phase_ratio(self, slow: str, fast: str, phase: str) -> Summary:
        a, b = self.phases[slow][phase], self.phases[fast][phase]
        return summarize([x / y for x, y in zip(a, b) if y > 0])

    def summary(self, name: str) -> Summary:
        return summarize(self.times[name])

    def ratio(self, slow: str, fast: str) -> Summary:
        """Per-round ratio slow/fast (>1 means `fast` is faster), summarised over rounds."""
        return summarize([a / b for a, b in zip(self.times[slow], self.times[fast]) if b > 0])


def run_interleaved(
    runners: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    per_round: int = 3,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    max_seconds: float | None = None,
    min_sample_s: float = 0.0,
) -> Interleaved:
    """Time every runner `per_round` times per round for `rounds` rounds, alternating the order.

    Each runner is warmed up `warmup` times first (untimed). A round's figure for a variant is the
    median of its `per_round` calls. Odd rounds run the variants in reverse order so neither always
    goes first. `max_seconds` stops early (after at least 2 complete rounds) to bound run time.
    `min_sample_s` > 0 repeats very fast calls back to back so one timed sample lasts at least that
    long (timer resolution and call overhead stop dominating); the time per call is recorded.
    A runner may return a dict {phase: seconds} (e.g. prefill, decode): those are recorded per round
    in `phases` (median over the round's calls) besides the wall time of the whole call.
    """
    if rounds < 1 or per_round < 1:
        raise ValueError("rounds and per_round must be >= 1")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    inner = dict.fromkeys(names, 1)
    if min_sample_s > 0:
        for name in names:
            t0 = clock()
            runners[name]()
            once = max(clock() - t0, 1e-9)
            inner[name] = max(1, min(10_000, int(min_sample_s / once + 0.999)))
    result = Interleaved(times={n: [] for n in names}, inner=inner)
    start = clock()
    for r in range(rounds):
        seq = names if r % 2 == 0 else names[::-1]
        for name in seq:
            calls = []
            phase_calls: dict[str, list[float]] = {}
            for _ in range(per_round):
                t0 = clock()
                for _ in range(inner[name]):
                    out = runners[name]()
                calls.append((clock() - t0) / inner[name])
                if isinstance(out, Mapping):
                    for phase, seconds in out.items():
                        phase_calls.setdefault(phase, []).append(float(seconds))
                result.order.append(name)
            result.times[name].append(statistics.median(calls))
            for phase, values in phase_calls.items():
                result.phases.setdefault(name, {}).setdefault(phase, []).append(statistics.median(values))
        if max_seconds is not None and r >= 1 and clock() - start > max_seconds:
            break
    return result
