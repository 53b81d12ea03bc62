"""Confidence intervals for success rates (no simulator, no plotting: imported by the runner and reports)."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a success rate: ``successes`` out of ``n`` trials, ``z`` = 1.96 for 95%.

    Unlike the normal approximation (p ± z·sqrt(p(1-p)/n)) it stays inside [0, 1] and is not zero-width at
    0/n or n/n, which matters for the small per-task counts of simulator evaluations (20-50 trials).
    Returns None when ``n`` is 0 (no rate, no interval), like the rates in results files.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}")
    if z <= 0:
        raise ValueError(f"wilson_interval z must be positive, got {z}")
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0/n and n/n the bound is exactly 0 or 1 in exact arithmetic; pin it so rounding cannot leave a
    # 1e-17 gap (or overshoot) in a results file.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def success_ci95(successes: int, n: int) -> list[float] | None:
    """The 95% Wilson interval as a JSON-friendly ``[lo, hi]`` (None without trials)."""
    ci = wilson_interval(successes, n)
    return None if ci is None else [ci[0], ci[1]]


__all__ = ["success_ci95", "wilson_interval"]
