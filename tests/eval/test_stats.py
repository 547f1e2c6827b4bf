"""Confidence intervals against textbook values and independent computations."""

from __future__ import annotations

import math
import random

import pytest

from picomaml.eval.stats import binomial_ci, mean_ci, normal_quantile, t_quantile

# Student t upper quantiles from standard tables (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2).
T_TABLE = {
    (0.975, 1): 12.706,
    (0.975, 2): 4.303,
    (0.975, 5): 2.571,
    (0.975, 10): 2.228,
    (0.975, 30): 2.042,
    (0.975, 100): 1.984,
    (0.975, 1000): 1.962,
    (0.995, 4): 4.604,
    (0.95, 20): 1.725,
    (0.95, 200): 1.653,
}


@pytest.mark.parametrize(("key", "expected"), sorted(T_TABLE.items()))
def test_t_quantile_matches_tables(key, expected):
    p, df = key
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-3)


def test_t_quantile_closed_forms_and_limits():
    # df=1 is Cauchy: tan(pi (p - 1/2)); df=2 has q = (2p - 1) sqrt(2 / (4 p (1 - p)))
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-9)
    # continuity across the exact / expansion switch, convergence to the normal
    assert t_quantile(0.975, 100) > t_quantile(0.975, 101) > t_quantile(0.975, 10_000) > 1.959964
    assert t_quantile(0.975, math.inf) == pytest.approx(normal_quantile(0.975))
    assert t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.9, 0)
    with pytest.raises(ValueError, match="p"):
        t_quantile(1.0, 3)


def test_mean_ci_against_direct_formula():
    rng = random.Random(0)
    xs = [rng.random() for _ in range(25)]
    mean, half = mean_ci(xs)
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    assert mean == pytest.approx(m)
    assert half == pytest.approx(2.0639 * s / 5, rel=1e-4)  # t(0.975, 24) = 2.0639
    _, half_normal = mean_ci(xs, method="normal")
    assert half_normal == pytest.approx(1.959964 * s / 5, rel=1e-5)
    assert half_normal < half


def test_mean_ci_edge_cases():
    assert mean_ci([3.0, 3.0, 3.0]) == (3.0, 0.0)
    m, h = mean_ci([0.4])
    assert m == 0.4 and math.isnan(h)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.0)


def test_t_interval_covers_at_nominal_rate():
    # 2000 samples of n=5 normals: a 95% t interval covers the true mean ~95% of the time (normal: less)
    rng = random.Random(1)
    cover_t = cover_z = 0
    trials = 2000
    for _ in range(trials):
        xs = [rng.gauss(1.0, 2.0) for _ in range(5)]
        m, h = mean_ci(xs)
        cover_t += abs(m - 1.0) <= h
        m, h = mean_ci(xs, method="normal")
        cover_z += abs(m - 1.0) <= h
    std = math.sqrt(0.95 * 0.05 / trials)
    assert abs(cover_t / trials - 0.95) < 4 * std
    assert cover_z / trials < 0.93  # the normal interval under-covers for n=5 (true coverage ~0.88)


def test_binomial_normal_half_width_known_case():
    low, high = binomial_ci(50, 100, method="normal")
    assert (high - low) / 2 == pytest.approx(1.959964 * 0.05, rel=1e-5)  # ~0.098
    assert (low + high) / 2 == pytest.approx(0.5)


def test_binomial_wilson_known_values():
    # Wilson 95% for 0/10: (0, 0.2775); for 50/100: (0.4038, 0.5962)
    low, high = binomial_ci(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = binomial_ci(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = binomial_ci(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="successes"):
        binomial_ci(11, 10)
    with pytest.raises(ValueError, match="n: must"):
        binomial_ci(0, 0)


def test_t_test_p_is_where_the_interval_reaches_zero():
    from picomaml.eval.stats import t_test_p

    values = [0.8, 1.5, 0.3, 1.1, 0.9]
    p = t_test_p(values)
    mean = sum(values) / len(values)
    assert mean_ci(values, confidence=1 - p)[1] == pytest.approx(mean, rel=1e-6)
    assert t_test_p([1.0, -1.0]) == pytest.approx(1.0) and t_test_p([2.0, 2.0]) == 0.0
    scipy_stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(scipy_stats.ttest_1samp(values, 0.0).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        t_test_p([1.0])


def test_holm_adjusts_step_down_in_input_order():
    from picomaml.eval.stats import holm

    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []
    with pytest.raises(ValueError, match="p_values"):
        holm([1.5])
