"""Confidence intervals for evaluation numbers, with the standard library only (no scipy).

``mean_ci`` uses Student's t with ``n - 1`` degrees of freedom (exact for normally distributed values
and close to the normal interval once ``n`` is in the hundreds), so a 10-episode evaluation does not
report an interval that is too narrow. The t quantile is found by bisection on the exact closed-form
CDF for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4) up to 100 degrees of freedom and by
the Cornish-Fisher expansion (A&S 26.7.5, error well below 1e-6 there) beyond.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Literal

from picomaml.params import check_int

__all__ = ["mean_ci", "binomial_ci", "t_quantile", "normal_quantile", "t_test_p", "holm"]

_EXACT_DF = 100


def normal_quantile(p: float) -> float:
    """The ``p`` quantile of the standard normal distribution, ``0 < p < 1``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return NormalDist().inv_cdf(p)


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (A&S 26.7.3 / 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    s = math.sin(theta)
    if df % 2 == 1:
        # odd df: (2/pi) * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df-2 terms in total
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        inner = s * math.cos(theta) * total if df > 1 else 0.0
        return (2.0 / math.pi) * (theta + inner)
    # even df: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df/2 terms
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df >= 1`` degrees of freedom.

    Args:
        p: Probability in (0, 1).
        df: Degrees of freedom (an integer; ``math.inf`` gives the normal quantile).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df != math.inf and (isinstance(df, bool) or not isinstance(df, int) or df < 1):
        raise ValueError(f"df must be an integer >= 1 (or math.inf), got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    z = normal_quantile(p)
    if df == math.inf:
        return z
    if df > _EXACT_DF:
        n = float(df)
        return (
            z
            + (z**3 + z) / (4 * n)
            + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4)
        )
    target = 2.0 * p - 1.0  # P(|T| <= t) for the upper p quantile
    lo, hi = 0.0, max(1.0, z)
    while _t_two_sided_mass(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided_mass(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_ci(
    values: Iterable[float], confidence: float = 0.95, method: Literal["t", "normal"] = "t"
) -> tuple[float, float]:
    """Sample mean and half-width of its two-sided confidence interval.

    The half-width is ``q * s / sqrt(n)`` with ``s`` the sample standard deviation (``n - 1`` in the
    denominator) and ``q`` the Student t quantile with ``n - 1`` degrees of freedom (``method="t"``) or
    the normal quantile (``method="normal"``).

    Args:
        values: Numbers (e.g. per-episode accuracies), at least one.
        confidence: Coverage in (0, 1).
        method: ``"t"`` (default) or ``"normal"``.

    Returns:
        ``(mean, half_width)``; the half-width is ``nan`` for a single value.
    """
    _check_confidence(confidence)
    if method not in ("t", "normal"):
        raise ValueError(f"method must be 't' or 'normal', got {method!r}")
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("values must not be empty")
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    p = 0.5 + confidence / 2.0
    q = t_quantile(p, n - 1) if method == "t" else normal_quantile(p)
    return mean, q * math.sqrt(var / n)


def t_test_p(values: Iterable[float]) -> float:
    """Two-sided p-value of the one-sample t-test of mean zero (e.g. paired differences between two arms).

    It is the ``1 - confidence`` at which [`mean_ci`][picomaml.eval.stats.mean_ci]'s t interval just
    reaches zero: ``P(|T| >= |mean| / (s / sqrt(n)))`` with ``n - 1`` degrees of freedom.

    Args:
        values: At least two numbers.

    Returns:
        The p-value in ``[0, 1]`` (0 when every value is the same non-zero number, 1 when all are zero).
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n < 2:
        raise ValueError(f"values: a t-test needs at least 2 values, got {n}")
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = abs(mean) / (sd / math.sqrt(n))
    if n - 1 > _EXACT_DF:
        return 2.0 * (1.0 - NormalDist().cdf(t))
    return max(0.0, 1.0 - _t_two_sided_mass(t, n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` for multiple comparisons (family-wise error rate).

    The ``i``-th smallest p-value is multiplied by ``m - i`` (``m`` tests, ``i`` from 0), made monotone and
    capped at 1; the adjusted values come back in the input order.
    """
    ps = [float(p) for p in p_values]
    if any(not 0.0 <= p <= 1.0 for p in ps):
        raise ValueError(f"p_values: each must be in [0, 1], got {ps}")
    order, out, running = sorted(range(len(ps)), key=ps.__getitem__), [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def binomial_ci(
    successes: int, n: int, confidence: float = 0.95, method: Literal["wilson", "normal"] = "wilson"
) -> tuple[float, float]:
    """Two-sided confidence interval ``(low, high)`` for a binomial proportion.

    ``"wilson"`` (default) is the Wilson score interval, which stays inside [0, 1] and behaves well near
    0 and 1; ``"normal"`` is the Wald interval ``p ± z sqrt(p (1 - p) / n)`` clipped to [0, 1].

    Args:
        successes: Number of successes, ``0 <= successes <= n``.
        n: Number of trials, ``>= 1``.
        confidence: Coverage in (0, 1).
        method: ``"wilson"`` or ``"normal"``.
    """
    _check_confidence(confidence)
    check_int("n", n, ge=1)
    if isinstance(successes, bool) or not isinstance(successes, int) or not 0 <= successes <= n:
        raise ValueError(f"successes must be an integer in [0, n={n}], got {successes!r}")
    z = normal_quantile(0.5 + confidence / 2.0)
    p = successes / n
    if method == "normal":
        half = z * math.sqrt(p * (1.0 - p) / n)
        return max(0.0, p - half), min(1.0, p + half)
    if method != "wilson":
        raise ValueError(f"method must be 'wilson' or 'normal', got {method!r}")
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    # the exact endpoints at 0 and n (rounding would leave 1e-17 there)
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high
