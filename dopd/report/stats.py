"""Statistics over seeds: 95% Student-t intervals, mean ± std, centred moving averages and curve bands."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95% Student t quantiles, used when scipy is missing (scipy ships with mlflow, so rarely).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """Two-sided 95% t quantile; the table falls back to the nearest smaller df (a slightly wider, safe interval)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


@dataclass
class Stat:
    """Mean, sample std (ddof=1), n and 95% CI half-width over seeds; std and CI are NaN for a single seed."""
    mean: float
    std: float
    n: int
    ci95: float
    values: tuple[float, ...] = ()


def summarize(values) -> Stat:
    vals = tuple(float(v) for v in values if v is not None and not math.isnan(v))
    n = len(vals)
    if n == 0:
        return Stat(math.nan, math.nan, 0, math.nan)
    mean = sum(vals) / n
    if n == 1:
        return Stat(mean, math.nan, 1, math.nan, vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return Stat(mean, std, n, t975(n - 1) * std / math.sqrt(n), vals)


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average: per-step train/* metrics are noisy, and a centred window does not shift them against
    the evaluation curves; near the ends it shrinks symmetrically, so a trend is not bent there."""
    out = []
    for i in range(len(values)):
        half = min(window // 2, i, len(values) - 1 - i)
        chunk = values[i - half: i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def band(histories: list[list[tuple[int, float]]], smooth: int = 1) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std (ddof=0) across seeds of per-seed (step, value) series, each smoothed first."""
    by_step: dict[int, list[float]] = {}
    for hist in histories:
        steps = [s for s, _ in hist]
        for s, v in zip(steps, moving_average([v for _, v in hist], smooth)):
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    std = [math.sqrt(sum((v - m) ** 2 for v in by_step[s]) / len(by_step[s])) for s, m in zip(steps, mean)]
    return steps, mean, std
