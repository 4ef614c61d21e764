"""mixq.timing: what is timed, how many calls, in which order."""
import time

import pytest

from mixq.timing import Latency, best_median_s, time_calls, time_round_robin


def test_time_calls_counts_warmup_apart_and_measures_the_call():
    calls = []
    latency = time_calls(lambda: (calls.append(1), time.sleep(0.003)), runs=5, warmup=2)
    assert len(calls) == 7 and latency.runs == 5
    assert all(t >= 0.003 for t in latency.times_s)  # sleep() never returns early
    assert latency.percentile_s(0) <= latency.median_s <= latency.percentile_s(100)


def test_min_seconds_repeats_fast_calls_up_to_max_runs():
    latency = time_calls(lambda: None, runs=3, warmup=1, min_seconds=10.0, max_runs=40)
    assert latency.runs == 40
    slow = time_calls(lambda: time.sleep(0.01), runs=3, warmup=1, min_seconds=0.02, max_runs=40)
    assert 3 <= slow.runs <= 3 + 2  # a 10 ms call needs about two runs for 20 ms


def test_round_robin_alternates_and_reports_every_label():
    order = []
    timed = time_round_robin({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert {k: v.runs for k, v in timed.items()} == {"a": 3, "b": 3}


def test_best_median_takes_the_least_disturbed_round():
    assert best_median_s([Latency((1.0, 2.0, 3.0)), Latency((0.5, 0.7, 9.0))]) == 0.7


@pytest.mark.parametrize("fn", [time_calls, time_round_robin])
def test_zero_runs_is_refused(fn):
    with pytest.raises(ValueError, match="runs must be at least 1"):
        fn({"a": lambda: None} if fn is time_round_robin else (lambda: None), runs=0)
