"""Timing: the medians every convc command reports (``convc demo``, ``convc
run``, ``convc bench``, ``convc bench --torch``).

Functions timed against each other run *in turn*: one call of each per round,
so a change in the machine's speed while they run (another process, a clock
change) moves all of them alike and their ratio stays fair. A single
function is the special case of one.

>>> med, runs = median_time(lambda: sum(range(1000)))          # doctest: +SKIP
>>> a, b = median_times_in_turn([f, g], min_rounds=20, seconds=1.0)   # doctest: +SKIP
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def times_in_turn(fns: list[Callable[[], object]], min_rounds: int = 5, seconds: float = 0.2,
                  max_seconds: float | None = None, at_least: int = 3, warmup: int = 1,
                  max_rounds: int | None = None) -> list[list[float]]:
    """Seconds of every call of each of ``fns``, run in turn (one call of each
    per round) after ``warmup`` warm-up rounds (cut short once a round takes
    more than ``max_seconds / 4``: one warm-up is enough for a slow case),
    for at least ``min_rounds`` rounds and ``seconds``; or ``at_least``
    rounds once ``max_seconds`` have passed; at most ``max_rounds``."""
    for _ in range(warmup):
        t = time.perf_counter()
        for fn in fns:
            fn()
        if max_seconds is not None and time.perf_counter() - t > max_seconds / 4:
            break
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while True:
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        elapsed, rounds = time.perf_counter() - start, len(times[0])
        if rounds >= min_rounds and elapsed >= seconds:
            break
        if max_seconds is not None and rounds >= min(at_least, min_rounds) and elapsed >= max_seconds:
            break
        if max_rounds is not None and rounds >= max(max_rounds, 1):
            break
    return times


def median_times_in_turn(fns: list[Callable[[], object]], min_rounds: int = 5, seconds: float = 0.2,
                         max_seconds: float | None = None, at_least: int = 3, warmup: int = 1) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn (:func:`times_in_turn`)."""
    return [statistics.median(t) for t in times_in_turn(fns, min_rounds, seconds, max_seconds, at_least, warmup)]


def median_time(fn: Callable[[], object], min_runs: int = 5, seconds: float = 0.2, max_seconds: float | None = None,
                warmup: int = 1, max_runs: int | None = None) -> tuple[float, int]:
    """(median seconds of ``fn()``, number of timed runs): at least
    ``min_runs`` runs and ``seconds`` of running, after ``warmup`` calls."""
    (times,) = times_in_turn([fn], min_runs, seconds, max_seconds, warmup=warmup, max_rounds=max_runs)
    return statistics.median(times), len(times)


def median_iqr(times: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of a list of timings: the spread says
    how noisy the runs were."""
    if len(times) < 2:
        return (times[0] if times else float("nan")), 0.0
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]
