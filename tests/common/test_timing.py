"""Harness statistics and interleaving, on fake clocks (no real timing asserted)."""

from __future__ import annotations

import pytest

from sparsedeploy.common.timing import NOISY_SPREAD, quantile, run_interleaved, summarize


class FakeClock:
    """A clock that advances only when a fake workload 'runs'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float):
        def run():
            self.now += seconds

        return run


def test_quantile_interpolates():
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([0.0, 10.0], 0.1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_summarize_median_spread_and_noise_flag():
    s = summarize([1.0, 1.0, 1.0, 1.0])
    assert s.median == 1.0 and s.spread == 0.0 and not s.noisy
    wide = summarize([1.0, 2.0, 3.0])
    assert wide.median == 2.0
    assert wide.spread == pytest.approx((2.8 - 1.2) / 2.0)
    assert wide.noisy and wide.spread > NOISY_SPREAD
    assert wide.min == 1.0 and wide.max == 3.0


def test_interleaving_alternates_order_and_warms_up():
    clock = FakeClock()
    calls = []

    def make(name, seconds):
        step = clock.work(seconds)
        return lambda: (calls.append(name), step())

    res = run_interleaved(
        {"dense": make("dense", 2.0), "sparse": make("sparse", 1.0)}, rounds=4, per_round=2, warmup=1, clock=clock
    )
    assert calls[:2] == ["dense", "sparse"]  # warm-up, untimed
    assert (
        res.order
        == ["dense"] * 2
        + ["sparse"] * 2
        + ["sparse"] * 2
        + ["dense"] * 2
        + ["dense"] * 2
        + ["sparse"] * 2
        + ["sparse"] * 2
        + ["dense"] * 2
    )
    assert res.times["dense"] == [2.0] * 4 and res.times["sparse"] == [1.0] * 4
    assert res.ratio("dense", "sparse").median == 2.0


def test_per_round_ratio_cancels_drift():
    """A machine that slows down 1.5x per round: absolute times drift, the per-round ratio stays 2."""
    clock = FakeClock()
    state = {"round_factor": 1.0, "calls": 0}

    def make(seconds):
        def run():
            clock.now += seconds * state["round_factor"]
            state["calls"] += 1
            if state["calls"] % 2 == 0:  # one call of each variant per round -> drift between rounds
                state["round_factor"] *= 1.5

        return run

    res = run_interleaved({"dense": make(2.0), "sparse": make(1.0)}, rounds=5, per_round=1, warmup=0, clock=clock)
    assert summarize(res.times["dense"]).noisy  # the absolute figures are noisy...
    ratio = res.ratio("dense", "sparse")
    assert ratio.median == pytest.approx(2.0) and not ratio.noisy
    assert max(res.times["dense"]) / min(res.times["dense"]) > 3


def test_phases_are_recorded_per_round():
    clock = FakeClock()

    def make(prefill, decode):
        def run():
            clock.now += prefill + decode
            return {"prefill": prefill, "decode": decode}

        return run

    res = run_interleaved(
        {"dense": make(4.0, 8.0), "sparse": make(2.0, 8.0)}, rounds=3, per_round=1, warmup=0, clock=clock
    )
    assert res.phases["dense"]["prefill"] == [4.0] * 3
    assert res.phase_ratio("dense", "sparse", "prefill").median == 2.0
    assert res.phase_ratio("dense", "sparse", "decode").median == 1.0


def test_min_sample_repeats_fast_calls():
    clock = FakeClock()
    count = {"n": 0}

    def run():
        clock.now += 0.001
        count["n"] += 1

    res = run_interleaved({"a": run}, rounds=2, per_round=1, warmup=0, clock=clock, min_sample_s=0.01)
    assert res.inner["a"] == 10
    assert res.times["a"] == [pytest.approx(0.001)] * 2
    assert count["n"] == 1 + 2 * 10  # calibration call + 2 samples of 10


def test_max_seconds_stops_after_two_rounds():
    clock = FakeClock()
    res = run_interleaved({"a": clock.work(10.0)}, rounds=50, per_round=1, warmup=0, clock=clock, max_seconds=5)
    assert len(res.times["a"]) == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        run_interleaved({"a": lambda: None}, rounds=0)
