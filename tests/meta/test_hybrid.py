"""HybridScheduler: pure in (seed, step), extremes, fractions, interleave pattern, weights, schedules."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest

from picomaml.meta.hybrid import HybridConfig, HybridScheduler, uniform_hash
from picomaml.params import ConfigError

N = 20_000


def test_field_names_match_config():
    fields = {f.name for f in dataclasses.fields(HybridConfig)}
    hs = HybridScheduler(**dataclasses.asdict(HybridConfig()), seed=3)
    assert fields <= set(hs.state_dict())


def test_choose_is_pure_in_step_order_and_instances():
    a = HybridScheduler(ratio=0.3, seed=7)
    forward = [a.choose(s) for s in range(2000)]
    order = list(range(2000))
    random.Random(0).shuffle(order)
    b = HybridScheduler(ratio=0.3, seed=7)
    shuffled = {s: b.choose(s) for s in order}
    assert [shuffled[s] for s in range(2000)] == forward
    # repeated calls and a fresh instance agree
    assert [a.choose(s) for s in range(2000)] == forward
    assert [HybridScheduler(ratio=0.3, seed=7).choose(s) for s in range(2000)] == forward
    # a different seed gives a different sequence
    assert [HybridScheduler(ratio=0.3, seed=8).choose(s) for s in range(2000)] != forward


@pytest.mark.parametrize("mode", ["bernoulli", "interleave"])
def test_ratio_extremes(mode):
    zero = HybridScheduler(ratio=0.0, mode=mode, seed=1)
    one = HybridScheduler(ratio=1.0, mode=mode, seed=1)
    assert all(zero.choose(s) == "ar" for s in range(N))
    assert all(one.choose(s) == "meta" for s in range(N))
    assert zero.objectives(5) == ("ar",) and one.objectives(5) == ("meta",)


def test_weighted_extremes_skip_zero_weight_objectives():
    assert HybridScheduler(ratio=0.0, mode="weighted").objectives(3) == ("ar",)
    assert HybridScheduler(ratio=1.0, mode="weighted").objectives(3) == ("meta",)
    assert HybridScheduler(ratio=0.25, mode="weighted").objectives(3) == ("ar", "meta")


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 12345])
def test_bernoulli_fraction_matches_ratio(ratio, seed):
    hs = HybridScheduler(ratio=ratio, mode="bernoulli", seed=seed)
    frac = sum(hs.choose(s) == "meta" for s in range(N)) / N
    std = math.sqrt(ratio * (1 - ratio) / N)
    assert abs(frac - ratio) < 4 * std, (frac, ratio, std)


def test_bernoulli_has_no_obvious_serial_correlation():
    hs = HybridScheduler(ratio=0.5, seed=0)
    x = [1 if hs.choose(s) == "meta" else 0 for s in range(N)]
    same = sum(a == b for a, b in zip(x, x[1:], strict=False)) / (N - 1)
    assert abs(same - 0.5) < 4 * math.sqrt(0.25 / N)


def test_uniform_hash_range_and_mean():
    us = [uniform_hash(3, s) for s in range(N)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert abs(sum(us) / N - 0.5) < 4 * math.sqrt(1 / 12 / N)


@pytest.mark.parametrize("ratio", [0.5, 1 / 3, 0.25, 0.7, 0.01])
def test_interleave_exact_fraction_and_spread(ratio):
    hs = HybridScheduler(ratio=ratio, mode="interleave")
    x = [hs.choose(s) == "meta" for s in range(N)]
    for prefix in (1, 7, 100, 999, N):
        assert sum(x[:prefix]) == math.floor(prefix * ratio + 1e-9)
    # evenly spread: every window of length ceil(1/r) holds at least one meta step
    w = math.ceil(1 / ratio)
    assert all(any(x[i : i + w]) for i in range(0, N - w))


def test_interleave_half_alternates_starting_with_ar():
    hs = HybridScheduler(ratio=0.5, mode="interleave")
    assert [hs.choose(s) for s in range(6)] == ["ar", "meta"] * 3


def test_weighted_mode():
    hs = HybridScheduler(ratio=0.3, mode="weighted")
    assert hs.choose(0) == "both"
    w_ar, w_meta = hs.weights(17)
    assert w_ar == pytest.approx(0.7) and w_meta == pytest.approx(0.3)


def test_weights_are_one_hot_outside_weighted_mode():
    hs = HybridScheduler(ratio=0.5, seed=2)
    for s in range(200):
        expected = (0.0, 1.0) if hs.choose(s) == "meta" else (1.0, 0.0)
        assert hs.weights(s) == expected
        assert hs.objectives(s) == (hs.choose(s),)


def test_warmup_ramps_from_zero():
    hs = HybridScheduler(ratio=0.8, warmup_steps=10)
    assert hs.ratio_at(0) == 0.0
    assert hs.ratio_at(5) == pytest.approx(0.4)
    assert hs.ratio_at(10) == pytest.approx(0.8) and hs.ratio_at(10_000) == pytest.approx(0.8)
    assert hs.choose(0) == "ar"


def test_linear_and_cosine_schedules():
    lin = HybridScheduler(ratio=0.8, schedule="linear", warmup_steps=10, total_steps=110, final_ratio=0.2)
    cos = HybridScheduler(ratio=0.8, schedule="cosine", warmup_steps=10, total_steps=110, final_ratio=0.2)
    assert lin.ratio_at(10) == pytest.approx(0.8) and cos.ratio_at(10) == pytest.approx(0.8)
    assert lin.ratio_at(60) == pytest.approx(0.5) and cos.ratio_at(60) == pytest.approx(0.5)
    assert lin.ratio_at(35) == pytest.approx(0.65)
    assert cos.ratio_at(35) == pytest.approx(0.2 + 0.6 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lin.ratio_at(110) == pytest.approx(0.2) and cos.ratio_at(500) == pytest.approx(0.2)
    # increasing schedules work too, and stay within [0, 1]
    up = HybridScheduler(ratio=0.0, schedule="linear", total_steps=100, final_ratio=1.0)
    rs = [up.ratio_at(s) for s in range(300)]
    assert rs == sorted(rs) and rs[0] == 0.0 and rs[-1] == 1.0
    # after the schedule reaches 1, AR never happens
    assert all(up.choose(s) == "meta" for s in range(100, 300))


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="ratio"):
        HybridScheduler(ratio=1.5)
    with pytest.raises(ConfigError, match="mode"):
        HybridScheduler(mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="schedule"):
        HybridScheduler(schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="total_steps"):
        HybridScheduler(schedule="cosine")
    with pytest.raises(ConfigError, match="warmup_steps"):
        HybridScheduler(warmup_steps=-1)
    with pytest.raises(ValueError, match="step"):
        HybridScheduler().choose(-1)
    with pytest.raises(TypeError, match="step"):
        HybridScheduler().choose(1.5)  # type: ignore[arg-type]


def test_state_dict_round_trip():
    a = HybridScheduler(
        ratio=0.2,
        mode="interleave",
        schedule="linear",
        warmup_steps=3,
        seed=9,
        total_steps=50,
        final_ratio=0.6,
    )
    b = HybridScheduler()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert [a.choose(s) for s in range(100)] == [b.choose(s) for s in range(100)]
    with pytest.raises(KeyError, match="unknown"):
        b.load_state_dict({"bogus": 1})


def test_choose_is_cheap():
    hs = HybridScheduler(ratio=0.5, schedule="cosine", total_steps=1000, seed=1)
    t0 = time.perf_counter()
    for s in range(10_000):
        hs.choose(s)
    per_call = (time.perf_counter() - t0) / 10_000
    assert per_call < 1e-4, per_call  # far below 1 ms even on a loaded CI core


def test_from_config():
    hs = HybridScheduler.from_config(HybridConfig(ratio=0.25, mode="interleave"), seed=4, total_steps=100)
    assert (hs.ratio, hs.mode, hs.seed, hs.total_steps) == (0.25, "interleave", 4, 100)
    cos = HybridScheduler.from_config({"ratio": 0.5, "schedule": "cosine"}, total_steps=50)
    assert cos.ratio_at(50) == 0.0
    with pytest.raises(TypeError):
        HybridScheduler.from_config({"ratio": 0.5, "bogus": 1})


def test_late_meta_takes_no_meta_step_before_its_start():
    hs = HybridScheduler(ratio=0.5, mode="interleave", total_steps=300, meta_start=2 / 3)
    kinds = [hs.choose(s) for s in range(300)]
    assert set(kinds[:200]) == {"ar"} and kinds[200:].count("meta") == 50
    weighted = HybridScheduler(ratio=0.3, mode="weighted", total_steps=30, meta_start=0.5)
    assert weighted.objectives(14) == ("ar",) and weighted.weights(15) == pytest.approx((0.7, 0.3))
    with pytest.raises(Exception, match="meta_start"):
        HybridScheduler(ratio=0.5, meta_start=0.5)  # a fraction of nothing
    restored = HybridScheduler()
    restored.load_state_dict(hs.state_dict())
    assert restored.choose(250) == hs.choose(250) and restored.meta_start == pytest.approx(2 / 3)
