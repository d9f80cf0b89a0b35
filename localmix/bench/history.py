"""Bench history in the store (one llama-bench jsonl object per line) and `--compare`.

A new result is compared with earlier results of the same model and test settings. A change is
flagged only when it lies outside the measured noise: |delta| > max(2 x the combined standard
deviation of both sides, 3 %). The floor is there because the spread within one run
underestimates the spread between runs (other processes, clocks, cache state).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localmix import settings
from localmix.bench.result import BenchResult, mean, stdev
from localmix.errors import OutputError

# Two results measure the same thing only when all of these match.
SAME_TEST = (
    "model_filename", "model_type", "model_size", "model_n_params", "n_prompt", "n_gen",
    "n_depth", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "n_gpu_layers",
    "tensor_buft_overrides", "repack", "rpc_servers",
)  # fmt: skip
# Settings of the machine and the run: matched when history has such a run; otherwise the
# comparison falls back to runs that differ here and names the difference.
SAME_RUN = ("n_threads", "backends", "cpu_info", "build_commit")
SIGMAS = 2.0
MIN_PCT = 3.0
WINDOW = 5  # earlier runs that make up a baseline (the most recent ones)


@dataclass(frozen=True)
class Comparison:
    """A result against its baseline of earlier runs; delta and threshold in percent."""

    result: BenchResult
    n_baseline: int  # earlier runs in the baseline (0: nothing to compare with)
    baseline_ts: float = 0.0
    baseline_stddev_ts: float = 0.0
    delta_pct: float = 0.0
    threshold_pct: float = 0.0
    flagged: bool = False
    changed: tuple[str, ...] = ()  # run settings that differ from the baseline: "n_threads 2→1"

    @property
    def verdict(self) -> str:
        if not self.n_baseline:
            return "new"
        if not self.flagged:
            # a change past the floor that the spread still covers is not "the same"
            return "within noise" if abs(self.delta_pct) > MIN_PCT else "same"
        return "slower" if self.delta_pct < 0 else "faster"


def append(results: Sequence[BenchResult], path: Path | None = None) -> Path:
    """Add results to the history file (JSON lines); returns its path."""
    path = path or settings.bench_history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            for result in results:
                handle.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    except OSError as exc:
        raise OutputError(
            f"cannot write bench history {path}: {exc.strerror}",
            hint="check LOCALMIX_HOME and its permissions",
        ) from exc
    return path


def load(path: Path | None = None) -> list[BenchResult]:
    """Every result in the history file, oldest first; unreadable lines are skipped."""
    path = path or settings.bench_history_path()
    if not path.is_file():
        return []
    results = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            results.append(BenchResult.from_json(json.loads(line)))
        except (ValueError, TypeError, KeyError):
            continue  # a line cut short by a crash must not hide the rest
    return results


def outside_noise(
    new_avg: float, new_std: float, base_avg: float, base_std: float
) -> tuple[float, float, bool]:
    """(delta %, threshold %, flagged) for a new mean against a baseline mean, t/s."""
    if base_avg <= 0:
        return 0.0, 0.0, False
    delta = new_avg - base_avg
    threshold = max(SIGMAS * math.hypot(new_std, base_std), MIN_PCT / 100 * base_avg)
    return 100 * delta / base_avg, 100 * threshold / base_avg, abs(delta) > threshold


def compare(results: Sequence[BenchResult], earlier: Sequence[BenchResult]) -> list[Comparison]:
    """Each result against the most recent earlier runs of the same test (see module doc)."""
    out = []
    for result in results:
        same_test = [e for e in earlier if _key(e, SAME_TEST) == _key(result, SAME_TEST)]
        same_run = [e for e in same_test if _key(e, SAME_RUN) == _key(result, SAME_RUN)]
        baseline = (same_run or same_test)[-WINDOW:]
        if not baseline:
            out.append(Comparison(result, 0))
            continue
        averages = [b.avg_ts for b in baseline]
        # Noise of the baseline: the spread between its runs or within them, whichever is larger.
        within = math.sqrt(mean([b.stddev_ts**2 for b in baseline]))
        base_std = max(stdev(averages), within)
        base_avg = mean(averages)
        delta, threshold, flagged = outside_noise(
            result.avg_ts, result.stddev_ts, base_avg, base_std
        )
        changed = tuple(
            f"{name} {getattr(baseline[-1], name)}→{getattr(result, name)}"
            for name in SAME_RUN
            if getattr(baseline[-1], name) != getattr(result, name)
        )
        out.append(
            Comparison(
                result, len(baseline), base_avg, base_std, delta, threshold, flagged, changed
            )
        )
    return out


def _key(result: BenchResult, names: Sequence[str]) -> tuple[object, ...]:
    return tuple(getattr(result, name) for name in names)
