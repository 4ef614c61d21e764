"""Latency measurement shared by the CLI, the examples and the benchmarks: wall clock around
each call, after warm-up, summarised by the median (robust to a shared, noisy machine)."""
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np

__all__ = ["Latency", "best_median_s", "time_calls", "time_round_robin"]


@dataclass(frozen=True)
class Latency:
    """Seconds taken by each timed call."""

    times_s: Tuple[float, ...]

    @property
    def runs(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return float(np.median(self.times_s))

    def percentile_s(self, q: float) -> float:
        return float(np.percentile(self.times_s, q))


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_calls(run: Callable[[], object], runs: int, warmup: int = 1, min_seconds: float = 0.0,
               max_runs: int = 1000, progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> Latency:
    """Time ``runs`` calls of ``run`` after ``warmup`` untimed ones. With ``min_seconds``, fast
    calls are repeated until about that long is timed (at most ``max_runs`` calls), so that a
    sub-millisecond engine's median is not read off a handful of samples. ``progress`` wraps the
    timed range (e.g. ``tqdm``)."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    warm = [_timed(run) for _ in range(max(1, warmup))]
    if min_seconds > 0:
        runs = max(runs, min(max_runs, int(min_seconds / max(min(warm), 1e-6))))
    return Latency(tuple(_timed(run) for _ in progress(range(runs))))


def time_round_robin(calls: Dict[str, Callable[[], object]], runs: int, warmup: int = 3,
                     progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> Dict[str, Latency]:
    """Time several callables in turn, one call each per round, so that load from other
    processes on a shared machine falls on all of them alike."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    for run in calls.values():
        for _ in range(warmup):
            run()
    times: Dict[str, List[float]] = {label: [] for label in calls}
    for _ in progress(range(runs)):
        for label, run in calls.items():
            times[label].append(_timed(run))
    return {label: Latency(tuple(t)) for label, t in times.items()}


def best_median_s(latencies: Sequence[Latency]) -> float:
    """The lowest median over repeated rounds (the round least disturbed by other load)."""
    return min(latency.median_s for latency in latencies)
