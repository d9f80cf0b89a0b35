"""Paired ratios for benchmarks on a noisy machine.

Each round measures localmix and llama.cpp's tool back to back, so a round's ratio cancels most of
the drift that other tenants cause; the verdict is the median of those per-round ratios, with a
bootstrap interval that says how far the median itself could move. Absolute t/s are printed for
scale only.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    """localmix / reference over rounds: median, 95% bootstrap interval and the extremes."""

    median: float
    low: float
    high: float
    lowest: float
    highest: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


def paired(ours: Sequence[float], ref: Sequence[float], resamples: int = 4000) -> Paired:
    """Per-round ratios ours[i] / ref[i] (each a round's mean t/s) summarised."""
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    rng = random.Random(0)  # the same interval for the same numbers
    medians = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)
    )
    return Paired(
        median=statistics.median(ratios),
        low=medians[int(0.025 * resamples)],
        high=medians[int(0.975 * resamples) - 1],
        lowest=min(ratios),
        highest=max(ratios),
        rounds=len(ratios),
    )


def mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"
