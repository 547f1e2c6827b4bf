"""SMLMTSampler and its functional core: every guarantee checked against the source rows, independently."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import picomaml as pm
from picomaml.meta import smlmt
from picomaml.meta.sampler import SamplerConfig, SamplingError, SMLMTSampler
from picomaml.params import ConfigError

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- independent references


def naive_windows(tokens: torch.Tensor, w: int) -> list[list[int]]:
    """Windows as Python lists, cut with plain loops."""
    out = []
    for row in tokens.tolist():
        for start in range(0, len(row) - w + 1, w):
            out.append(row[start : start + w])
    return out


def naive_counts(tokens: torch.Tensor, w: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for win in naive_windows(tokens, w):
        for t in set(win):
            counts[t] = counts.get(t, 0) + 1
    return counts


def naive_eligible(tokens, w, per_class, min_freq, max_freq, excluded) -> set[int]:
    n_win = len(naive_windows(tokens, w))
    lo = min_freq * n_win if 0 < min_freq < 1 else min_freq
    hi = max_freq * n_win if 0 < max_freq < 1 else max_freq
    return {
        t
        for t, c in naive_counts(tokens, w).items()
        if lo <= c <= hi and c >= per_class and t not in excluded
    }


def max_assignment(sets: list[list[int]], need: int) -> int:
    """Size of a maximum b-matching (each class up to ``need`` windows, each window once), by Kuhn's DFS."""
    owner: dict[int, int] = {}

    def augment(c: int, seen: set[int]) -> bool:
        for w in sets[c]:
            if w not in seen:
                seen.add(w)
                if w not in owner or augment(owner[w], seen):
                    owner[w] = c
                    return True
        return False

    return sum(augment(c, set()) for c in range(len(sets)) for _ in range(need))


def check_episode(ep: pm.Episode, tokens: torch.Tensor, s: SMLMTSampler) -> None:
    """Assert every documented guarantee of one (single-task) episode against the source rows."""
    n, k, q, w, m = s.n_way, s.k_shot, s.n_query, s.window_len, s.mask_token_id
    assert ep.support_ids.shape == (n * k, w) and ep.query_ids.shape == (n * q, w)
    assert ep.class_token_ids.shape == (n,) and ep.n_tasks is None
    ep.validate(mask_token_id=m)
    assert torch.equal(ep.support_labels, torch.arange(n).repeat_interleave(k))
    assert torch.equal(ep.query_labels, torch.arange(n).repeat_interleave(q))
    eligible = naive_eligible(tokens, w, k + q, s.min_freq, s.max_freq, set(s.exclude_token_ids) | {m})
    classes = ep.class_token_ids.tolist()
    assert len(set(classes)) == n and set(classes) <= eligible  # frequency band honoured
    per_row = tokens.shape[1] // w
    used = ep.support_windows.tolist() + ep.query_windows.tolist()
    assert len(set(used)) == len(used)  # no window twice in an episode
    for part in ("support", "query"):
        ids, labels, mask, wins = (getattr(ep, f"{part}_{x}") for x in ("ids", "labels", "mask", "windows"))
        rows, starts = ep.origins(part)
        for i in range(ids.shape[0]):
            r, start = divmod(int(wins[i]), per_row)
            original = tokens[r, start * w : start * w + w]  # W consecutive tokens of one row
            assert (int(rows[i]), int(starts[i])) == (r, start * w)
            c = classes[int(labels[i])]
            assert bool((original == c).any())  # the window contains its class token
            assert torch.equal(mask[i], original == c)  # every occurrence masked, nothing else
            assert bool((ids[i][mask[i]] == m).all())
            assert torch.equal(ids[i][~mask[i]], original[~mask[i]])  # other tokens untouched
            assert not bool((ids[i] == c).any())


def zipf_tokens(rows: int, length: int, vocab: int, seed: int, a: float = 1.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** a
    return torch.multinomial(p, rows * length, replacement=True, generator=g).view(rows, length)


# ---------------------------------------------------------------------- property-based


@FAST
@given(
    seed=st.integers(0, 10_000),
    vocab=st.integers(3, 30),
    rows=st.integers(1, 6),
    w=st.integers(2, 8),
    extra=st.integers(0, 7),
    n=st.integers(2, 4),
    k=st.integers(1, 3),
    q=st.integers(1, 2),
    band=st.sampled_from([(0, 0.9), (2, 0.5), (0.1, 20), (1, 1000), (3, 0.99)]),
    mask_in_vocab=st.booleans(),
    sampling=st.sampled_from(["uniform", "count_power"]),
)
def test_random_buffers_give_valid_episodes_or_clear_errors(
    seed, vocab, rows, w, extra, n, k, q, band, mask_in_vocab, sampling
):
    g = torch.Generator().manual_seed(seed)
    per_row = 1 + int(torch.randint(0, 6, (), generator=g))
    tokens = torch.randint(0, vocab, (rows, per_row * w + extra % w), generator=g)
    mask = 0 if mask_in_vocab else vocab
    s = SMLMTSampler(
        n,
        k,
        q,
        mask_token_id=mask,
        window_len=w,
        min_freq=band[0],
        max_freq=band[1],
        exclude_token_ids=(1,),
        class_sampling=sampling,
        seed=seed,
    )
    if bool((tokens[:, : per_row * w] == mask).any()):  # the mask id is a real token of the windows
        event("mask id in the data")
        with pytest.raises(SamplingError, match=f"mask_token_id: {mask} is a real token of these rows"):
            s.sample(tokens)
        return
    eligible = naive_eligible(tokens, w, k + q, band[0], band[1], {1, mask})
    assert set(s.eligible(tokens).tolist()) == eligible
    if len(eligible) < n:
        event("too few eligible")
        with pytest.raises(SamplingError, match=f"only {len(eligible)} token types are eligible"):
            s.sample(tokens)
        return
    try:
        ep = s.sample(tokens)
    except SamplingError as exc:  # placement impossible for every redraw: must be a genuine conflict
        assert "without reusing a window" in str(exc)
        event("placement impossible")
        return
    event("episode")
    check_episode(ep, tokens, s)


@FAST
@given(seed=st.integers(0, 10_000), n_win=st.integers(2, 12), n=st.integers(2, 4), need=st.integers(1, 3))
def test_assign_windows_finds_an_assignment_exactly_when_one_exists(seed, n_win, n, need):
    g = torch.Generator().manual_seed(seed)
    # window j holds class tokens 1..n with probability 0.5 each (filler 0 elsewhere)
    present = torch.rand(n_win, n, generator=g) < 0.5
    windows = torch.where(present, torch.arange(1, n + 1), torch.zeros((), dtype=torch.long))
    index = smlmt.build_index(windows, window_len=n)
    classes = torch.arange(1, n + 1)
    sets = [index.windows_of(c).tolist() for c in range(1, n + 1)]
    if any(len(x) < need for x in sets):
        return  # the sampler never asks for classes with too few windows
    got = smlmt.assign_windows(index, classes, need, g)
    feasible = max_assignment(sets, need) == n * need
    event(f"feasible={feasible}")
    assert (got is not None) == feasible
    if got is not None:
        assert got.shape == (n, need)
        assert torch.unique(got).numel() == n * need
        for c in range(n):
            assert set(got[c].tolist()) <= set(sets[c])


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 20), w=st.integers(1, 9), vocab=st.integers(1, 50))
def test_incidence_numpy_and_torch_paths_agree(seed, n, w, vocab):
    windows = torch.randint(0, vocab, (n, w), generator=torch.Generator().manual_seed(seed))
    a_win, a_ids, a_cnt = smlmt._incidence(windows, use_numpy=True)
    b_win, b_ids, b_cnt = smlmt._incidence(windows, use_numpy=False)
    assert torch.equal(a_win, b_win) and torch.equal(a_ids, b_ids) and torch.equal(a_cnt, b_cnt)
    assert a_win.dtype == a_ids.dtype == a_cnt.dtype == torch.long
    present = sorted(set(windows.flatten().tolist()))  # sized by the ids present, not the largest id
    assert a_ids.tolist() == present
    assert a_cnt.tolist() == [sum(t in row for row in windows.tolist()) for t in present]


def test_conflicting_windows_are_repaired_not_reused():
    # token 1 is in windows 0..3, token 2 only in windows 0,1; a valid episode must give 2 -> {0,1}, 1 -> {2,3}
    w0 = [1, 2, 0, 0]
    tokens = torch.tensor([w0 + w0 + [1, 0, 0, 0] + [1, 0, 0, 0]])
    s = SMLMTSampler(
        2, 1, 1, mask_token_id=9, window_len=4, min_freq=0, max_freq=1000, exclude_token_ids=(0,)
    )
    for _ in range(20):
        ep = s.sample(tokens)
        check_episode(ep, tokens, s)
        label_of_2 = ep.class_token_ids.tolist().index(2)
        wins = torch.cat(
            [
                ep.support_windows[ep.support_labels == label_of_2],
                ep.query_windows[ep.query_labels == label_of_2],
            ]
        )
        assert sorted(wins.tolist()) == [0, 1]


def test_impossible_assignment_raises():
    # tokens 1 and 2 occur only together, in 2 windows: 2 classes x 2 windows need 4 distinct windows
    tokens = torch.tensor([[1, 2, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0]])
    s = SMLMTSampler(
        2, 1, 1, mask_token_id=9, window_len=4, min_freq=0, max_freq=1000, exclude_token_ids=(0,)
    )
    with pytest.raises(SamplingError, match="without reusing a window"):
        s.sample(tokens)


# ---------------------------------------------------------------------- realistic buffer


@pytest.fixture(scope="module")
def zipf() -> torch.Tensor:
    return zipf_tokens(8, 512, vocab=2000, seed=1)


def test_zipf_buffer_many_episodes(zipf):
    s = SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, min_freq=4, max_freq=0.5, seed=3)
    for _ in range(10):
        check_episode(s.sample(zipf), zipf, s)


def test_labels_are_a_fresh_permutation_per_task(zipf):
    s = SMLMTSampler(3, 1, 1, mask_token_id=2000, window_len=32, min_freq=60, max_freq=0.9, seed=0)
    eligible = s.eligible(zipf).tolist()
    assert 3 <= len(eligible) <= 6  # a small pool, so each token recurs in many tasks
    seen: dict[int, list[int]] = {t: [] for t in eligible}
    for _ in range(300):
        ep = s.sample(zipf)
        for label, t in enumerate(ep.class_token_ids.tolist()):
            seen[t].append(label)
    for t, labels in seen.items():
        if len(labels) >= 50:
            freq = [labels.count(lab) / len(labels) for lab in range(3)]
            assert min(freq) > 0.15, (t, freq)  # each label appears, roughly 1/3 each


def test_frequency_band_fraction_and_count(zipf):
    n_win = 8 * (512 // 32)
    counts = naive_counts(zipf, 32)
    for min_f, max_f in [(0.05, 0.3), (10, 40), (0, 0.2)]:
        s = SMLMTSampler(4, 2, 2, mask_token_id=2000, window_len=32, min_freq=min_f, max_freq=max_f)
        lo, hi = (min_f * n_win if 0 < min_f < 1 else min_f), (max_f * n_win if max_f < 1 else max_f)
        got = set(s.eligible(zipf).tolist())
        assert got == {t for t, c in counts.items() if max(lo, 4) <= c <= hi}
        for _ in range(5):
            ep = s.sample(zipf)
            assert all(lo <= counts[t] <= hi for t in ep.class_token_ids.tolist())


def test_mask_and_excluded_tokens_never_classes(zipf):
    frequent = naive_counts(zipf, 32)
    top = sorted(frequent, key=frequent.get, reverse=True)[:12]
    frequent_mask = SMLMTSampler(
        4, 1, 1, mask_token_id=top[0], window_len=32, min_freq=0, max_freq=10_000, exclude_token_ids=top[1:6]
    )
    n_windows = zipf.shape[0] * (zipf.shape[1] // 32)
    times = int((zipf[:, : n_windows // zipf.shape[0] * 32] == top[0]).sum())
    message = f"mask_token_id: {top[0]} is a real token of these rows: it occurs {times} times, in {frequent[top[0]]} "
    with pytest.raises(SamplingError, match=message):  # a real, frequent token cannot be the mask
        frequent_mask.sample(zipf)
    s = SMLMTSampler(
        4, 1, 1, mask_token_id=2000, window_len=32, min_freq=0, max_freq=10_000, exclude_token_ids=top[1:6]
    )
    assert not set(top[1:6]) & set(s.eligible(zipf).tolist()) and top[0] in s.eligible(zipf).tolist()
    for _ in range(20):
        ep = s.sample(zipf)
        assert not set(top[1:6]) & set(ep.class_token_ids.tolist())
        check_episode(ep, zipf, s)


def test_count_power_prefers_frequent_tokens():
    # token 1 is in all 60 windows; tokens 2..6 in 6 windows each; 0 is filler (excluded). N = 2.
    rows = [[1, 0, 2 + (j // 6) if j < 30 else 0, 0] for j in range(60)]
    tokens = torch.tensor([sum(rows, [])])
    weights_of = {1: 60.0, **{t: 6.0 for t in range(2, 7)}}

    def p_first_in(power: float) -> float:  # P(token 1 among 2 draws without replacement, prop. to weight)
        w = {t: c**power for t, c in weights_of.items()}
        total = sum(w.values())
        p = w[1] / total
        return p + sum(w[t] / total * w[1] / (total - w[t]) for t in range(2, 7))

    for sampling, power in [("uniform", 1.0), ("count_power", 0.3), ("count_power", 1.0)]:
        s = SMLMTSampler(
            2,
            1,
            1,
            mask_token_id=9,
            window_len=4,
            min_freq=0,
            max_freq=1000,
            exclude_token_ids=(0,),
            class_sampling=sampling,
            power=power,
            seed=5,
        )
        classes = [s.sample(tokens).class_token_ids.tolist() for _ in range(600)]
        hits = sum(1 in c for c in classes)
        expected = 2 / 6 if sampling == "uniform" else p_first_in(power)
        assert abs(hits / 600 - expected) < 0.07, (sampling, power, hits / 600, expected)
        # labels come from a fresh permutation, not the draw order (which favours frequent tokens first)
        label0 = sum(c[0] == 1 for c in classes) / hits
        assert abs(label0 - 0.5) < 0.1, (sampling, power, label0)
    assert p_first_in(1.0) > 0.85 > 2 / 6  # the test distinguishes the modes


# ---------------------------------------------------------------------- determinism and state


def episodes_equal(a: pm.Episode, b: pm.Episode) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in (
            "support_ids",
            "support_mask",
            "query_ids",
            "class_token_ids",
            "support_windows",
            "query_windows",
        )
    )


def test_same_seed_same_episodes_different_seed_differs(zipf):
    make = lambda seed: SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, seed=seed)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    ea = [a.sample(zipf) for _ in range(3)]
    eb = [b.sample(zipf) for _ in range(3)]
    ec = [c.sample(zipf) for _ in range(3)]
    assert all(episodes_equal(x, y) for x, y in zip(ea, eb, strict=True))
    assert not any(episodes_equal(x, y) for x, y in zip(ea, ec, strict=True))
    assert not episodes_equal(ea[0], ea[1])


def test_state_dict_round_trip_continues_the_stream(zipf):
    a = SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, seed=11)
    for _ in range(3):
        a.sample(zipf)
    state = a.state_dict()
    assert set(state) == {"generator", "seed", "episodes_sampled"} and state["episodes_sampled"] == 3
    expected = [a.sample(zipf) for _ in range(3)] + [a.sample(zipf, n_tasks=2)]
    b = SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, seed=999)
    b.load_state_dict(state)
    assert b.seed == 11 and b.episodes_sampled == 3
    got = [b.sample(zipf) for _ in range(3)] + [b.sample(zipf, n_tasks=2)]
    assert all(episodes_equal(x, y) for x, y in zip(expected, got, strict=True))
    assert b.episodes_sampled == 8
    with pytest.raises(KeyError, match="generator"):
        b.load_state_dict({"seed": 1, "episodes_sampled": 0})


def test_n_tasks_stacking(zipf):
    s = SMLMTSampler(4, 2, 3, mask_token_id=2000, window_len=32, seed=2)
    ep = s.sample(zipf, n_tasks=3)
    assert ep.n_tasks == 3
    assert ep.support_ids.shape == (3, 8, 32) and ep.query_ids.shape == (3, 12, 32)
    assert ep.support_labels.shape == (3, 8) and ep.class_token_ids.shape == (3, 4)
    ep.validate(mask_token_id=2000)
    for i in range(3):
        check_episode(ep.task(i), zipf, s)
    assert not torch.equal(ep.class_token_ids[0], ep.class_token_ids[1])  # independent tasks
    one = s.sample(zipf, n_tasks=1)
    assert one.n_tasks == 1 and one.support_ids.shape == (1, 8, 32)


def test_index_cache(zipf):
    s = SMLMTSampler(4, 2, 2, mask_token_id=2000, window_len=32)
    buf = zipf.clone()
    idx = s.index(buf)
    assert s.index(buf) is idx  # same tensor, same version: cached
    s.sample(buf)
    assert s.index(buf) is idx
    buf[0, 0] = 5  # in-place edit bumps the version: rebuilt
    assert s.index(buf) is not idx
    assert s.index(buf.clone()) is not s.index(buf)
    ep = s.sample(idx)  # an index can be passed directly
    check_episode(ep, zipf, s)
    counts = naive_counts(zipf, 32)
    assert all(idx.count_of(t) == c for t, c in counts.items())
    assert int(idx.counts.sum()) == sum(counts.values())
    assert idx.token_ids.tolist() == sorted(counts) and idx.count_of(10**9) == 0


# ---------------------------------------------------------------------- streaming


def test_streaming_yields_valid_episodes_from_the_current_buffer():
    rows = [zipf_tokens(1, 64, vocab=300, seed=100 + i)[0] for i in range(12)]
    items = [rows[0], torch.stack(rows[1:3])] + rows[3:]  # a 1-D row, a (2, L) batch, then single rows
    s = SMLMTSampler(3, 1, 1, mask_token_id=300, window_len=16, min_freq=2, max_freq=0.5, seed=4)
    out = list(s.episodes(iter(items), buffer_rows=8, refresh=2))
    # buffer states: rows 0..7, then 1..8, 2..9, 3..10, 4..11 -> 5 states x 2 episodes
    assert len(out) == 10
    for i, ep in enumerate(out):
        start = i // 2
        check_episode(ep, torch.stack(rows[start : start + 8]), s)


def test_streaming_short_iterable_and_errors():
    s = SMLMTSampler(2, 1, 1, mask_token_id=300, window_len=16, min_freq=1, max_freq=0.9)
    rows = zipf_tokens(3, 64, vocab=300, seed=0)
    out = list(s.episodes([rows], buffer_rows=16, n_tasks=2))  # never fills: one state from what came
    assert len(out) == 1 and out[0].n_tasks == 2
    assert list(s.episodes([])) == []
    with pytest.raises(ValueError, match="length 32"):
        list(s.episodes([rows, rows[:, :32]], buffer_rows=3))
    with pytest.raises(ValueError, match="buffer_rows"):
        next(s.episodes([rows], buffer_rows=0))
    with pytest.raises(ValueError, match="refresh"):
        next(s.episodes([rows], refresh=0))


# ---------------------------------------------------------------------- errors


def test_too_few_eligible_classes_message_has_numbers():
    tokens = zipf_tokens(2, 64, vocab=50, seed=0)
    s = SMLMTSampler(40, 2, 2, mask_token_id=50, window_len=16, min_freq=0, max_freq=0.5)
    with pytest.raises(SamplingError) as info:
        s.sample(tokens)
    msg = str(info.value)
    n_eligible = s.eligible(tokens).numel()
    for part in (
        f"only {n_eligible} token types",
        "n_way=40",
        "8 windows",
        "k_shot + n_query = 4",
        "more rows",
    ):
        assert part in msg, (part, msg)


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        (torch.zeros(10, dtype=torch.long), ValueError, r"2-D tensor.*unsqueeze"),
        (torch.zeros(2, 10), TypeError, "torch.long"),
        (torch.zeros(2, 10, dtype=torch.int32), TypeError, "torch.long"),
        ([[1, 2, 3]], TypeError, "LongTensor"),
        (torch.zeros(2, 3, dtype=torch.long), ValueError, "fewer than window_len=4"),
        (torch.zeros(0, 8, dtype=torch.long), ValueError, "empty"),
        (torch.full((2, 8), -1, dtype=torch.long), ValueError, ">= 0"),
    ],
)
def test_bad_tokens(tokens, error, match):
    s = SMLMTSampler(2, 1, 1, mask_token_id=0, window_len=4)
    with pytest.raises(error, match=match):
        s.sample(tokens)
    with pytest.raises(ValueError):  # every bad-buffer error is also a ValueError
        s.sample(tokens)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_shot": 0}, "k_shot"),
        ({"n_query": 0}, "n_query"),
        ({"n_way": 1}, "n_way"),
        ({"window_len": 2.0}, "window_len"),
        ({"mask_token_id": -1}, "mask_token_id"),
        ({"class_sampling": "zipf"}, "class_sampling.*uniform"),
        ({"min_freq": -1}, "min_freq"),
        ({"max_freq": 0}, "max_freq"),
        ({"power": 0}, "power"),
        ({"exclude_token_ids": (-3,)}, "exclude_token_ids"),
        ({"seed": "a"}, "seed"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    args = {"n_way": 2, "k_shot": 1, "n_query": 1, "mask_token_id": 0, "window_len": 4, **kwargs}
    with pytest.raises(ConfigError, match=match):
        SMLMTSampler(**args)


def test_bad_n_tasks(zipf):
    s = SMLMTSampler(2, 1, 1, mask_token_id=2000, window_len=32)
    with pytest.raises(ValueError, match="n_tasks"):
        s.sample(zipf, n_tasks=0)


def test_from_config_and_field_names():
    cfg = SamplerConfig(n_way=3, k_shot=2, n_query=1, window_len=8, min_freq=0.01, max_freq=100)
    s = SMLMTSampler.from_config(cfg, mask_token_id=7, seed=3)
    assert (s.n_way, s.k_shot, s.n_query, s.window_len, s.min_freq, s.max_freq, s.seed) == (
        3,
        2,
        1,
        8,
        0.01,
        100,
        3,
    )
    import dataclasses
    import inspect

    params = set(inspect.signature(SMLMTSampler).parameters)
    assert params == {f.name for f in dataclasses.fields(SamplerConfig)} | {"mask_token_id", "seed", "pad_token_id"}
    assert pm.SMLMTSampler is SMLMTSampler
    assert math.isclose(SMLMTSampler(2, 1, 1, 0, 4).max_freq, SamplerConfig.max_freq)


def test_torch_only_path_matches(zipf, monkeypatch):
    with_numpy = SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, exclude_token_ids=(3, 5), seed=1)
    expected = with_numpy.sample(zipf)
    monkeypatch.setattr(smlmt, "_numpy_available", lambda: False)
    without = SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, exclude_token_ids=(3, 5), seed=1)
    assert torch.equal(without.eligible(zipf), with_numpy.eligible(zipf))
    assert episodes_equal(without.sample(zipf), expected)


def test_mask_token_excluded_without_being_listed():
    s = SMLMTSampler(
        2, 1, 1, mask_token_id=4, window_len=4, min_freq=0, max_freq=1000, exclude_token_ids=(1,)
    )
    assert s.exclude_token_ids == (1,)  # the user's list is kept as given (round-trips to the config)
    assert 4 in s._excluded  # never a class, even from an index that holds it
    tokens = torch.tensor([[5, 2, 3, 1] * 6])
    assert set(s.eligible(tokens).tolist()) == {2, 3, 5}
    with pytest.raises(SamplingError, match="mask_token_id: 4 is a real token of these rows: it occurs 6 times"):
        s.eligible(torch.tensor([[4, 2, 3, 1] * 6]))  # a mask id that the data holds is refused


def test_worked_example_in_docs():
    """docs/pages/episodes.md shows this episode; keep the page honest."""
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", "park", "[M]"]
    rows = [
        "the cat sat on a mat the dog ran to a park".split(),
        "a dog sat on the mat the cat ran to the park".split(),
    ]
    tokens = torch.tensor([[words.index(w) for w in r] for r in rows])
    s = SMLMTSampler(2, 1, 1, mask_token_id=10, window_len=4, min_freq=2, max_freq=0.5, seed=0)
    assert [words[t] for t in s.eligible(tokens).tolist()] == [w for w in words[:10] if w != "the"]
    ep = s.sample(tokens)
    decode = lambda ids: " ".join(words[t] for t in ids.tolist())  # noqa: E731
    assert [words[t] for t in ep.class_token_ids.tolist()] == ["a", "to"]
    assert [decode(r) for r in ep.support_ids] == ["[M] mat the dog", "ran [M] a park"]
    assert [decode(r) for r in ep.query_ids] == ["[M] dog sat on", "ran [M] the park"]
    assert ep.support_windows.tolist() == [1, 2] and ep.query_windows.tolist() == [3, 5]
    assert ep.support_mask.int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]


# ---------------------------------------------------------------------- held-out class split


def test_heldout_mask_is_a_stable_hash_of_the_id_with_about_the_requested_share():
    ids = torch.arange(50_000)
    mask = smlmt.heldout_token_mask(ids, 0.2, seed=0)
    assert abs(mask.float().mean().item() - 0.2) < 0.01
    # a pure function of (id, seed): any subset, in any order, gets the same answer
    perm = torch.randperm(50_000, generator=torch.Generator().manual_seed(1))[:777]
    assert torch.equal(smlmt.heldout_token_mask(perm, 0.2, seed=0), mask[perm])
    other = smlmt.heldout_token_mask(ids, 0.2, seed=1)
    assert not torch.equal(mask, other)
    # seeds give (nearly) independent splits: overlap close to 0.2 * 0.2
    assert abs((mask & other).float().mean().item() - 0.04) < 0.01
    # fractions nest: a larger fraction holds out a superset
    assert bool((mask <= smlmt.heldout_token_mask(ids, 0.3, seed=0)).all())
    assert not smlmt.heldout_token_mask(ids, 0.0).any()
    with pytest.raises(ValueError, match="holdout_fraction"):
        smlmt.heldout_token_mask(ids, 1.0)


def test_train_and_heldout_samplers_never_share_a_class():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 300, (64, 64), generator=gen)
    common = dict(n_way=4, k_shot=2, n_query=2, mask_token_id=0, window_len=16, min_freq=4, max_freq=0.9)
    train = SMLMTSampler(**common, holdout_fraction=0.3, holdout_seed=5, class_split="train", seed=1)
    held = SMLMTSampler(**common, holdout_fraction=0.3, holdout_seed=5, class_split="heldout", seed=1)
    full = SMLMTSampler(**common, seed=1)
    e_train, e_held, e_all = (set(s.eligible(tokens).tolist()) for s in (train, held, full))
    assert e_train and e_held
    assert e_train.isdisjoint(e_held) and e_train | e_held == e_all  # an exact partition
    assert e_held == set(held.heldout_token_ids(300).tolist()) & e_all
    train_classes = {c for _ in range(50) for c in train.sample(tokens).class_token_ids.tolist()}
    held_classes = {c for _ in range(50) for c in held.sample(tokens).class_token_ids.tolist()}
    assert train_classes <= e_train and held_classes <= e_held


def test_heldout_split_validation_names_the_argument():
    common = dict(n_way=2, k_shot=1, n_query=1, mask_token_id=0, window_len=4)
    with pytest.raises(ConfigError, match="class_split"):
        SMLMTSampler(**common, class_split="heldout")  # nothing is held out
    with pytest.raises(ConfigError, match="class_split"):
        SMLMTSampler(**common, holdout_fraction=0.2, class_split="eval")
    with pytest.raises(ConfigError, match="holdout_fraction"):
        SMLMTSampler(**common, holdout_fraction=1.0)
    with pytest.raises(ConfigError, match="holdout_seed"):
        SMLMTSampler(**common, holdout_fraction=0.2, holdout_seed=1.5)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        SamplerConfig(holdout_fraction=-0.1)


def test_a_too_small_heldout_split_says_so():
    tokens = torch.randint(3, 40, (16, 32), generator=torch.Generator().manual_seed(0))
    held = SMLMTSampler(
        n_way=8, k_shot=1, n_query=1, mask_token_id=0, window_len=8, min_freq=1, max_freq=0.99,
        holdout_fraction=0.05, class_split="heldout",
    )  # fmt: skip
    with pytest.raises(SamplingError, match="'heldout' class split"):
        held.sample(tokens)


# ---------------------------------------------------------------------- ids the counting scheme cannot take


def test_huge_ids_are_counted_exactly_or_refused_and_never_size_the_index():
    # 64 windows: the keys id * 64 + window fit int64 up to id 2**57 - 1; 2**57 used to overflow into
    # another token's counts
    top = (2**63 - 64) // 64
    assert top == 2**57 - 1
    tokens = torch.randint(0, 20, (8, 64), generator=torch.Generator().manual_seed(0))  # 8 windows per row
    # 2**40 rather than the 3e9: were the index sized by the largest id again, this fails at once
    # (MemoryError) instead of filling 22 GiB
    tokens[0, 0], tokens[3, 9], tokens[5, 63] = top, top, 2**40
    index = smlmt.build_index(tokens, window_len=8)
    assert index.count_of(top) == 2 and index.windows_of(top).tolist() == [0, 25]
    assert index.count_of(2**40) == 1 and index.vocab_size == top + 1
    naive = naive_counts(tokens, 8)
    assert {int(t): index.count_of(int(t)) for t in index.token_ids} == naive
    # sized by the ids present
    assert index.counts.numel() == index.token_ids.numel() == len(naive) and index.offsets.numel() == len(naive) + 1
    tokens[0, 0] = 2**57
    with pytest.raises(ValueError, match=rf"^tokens: token id {2**57} is too large: a buffer of 64 windows takes "
                       rf"ids up to {top}"):
        SMLMTSampler(2, 1, 1, mask_token_id=21, window_len=8).sample(tokens)


def test_episodes_with_huge_ids_are_those_of_small_ids_in_the_same_order():
    tokens = zipf_tokens(16, 64, 50, seed=3)
    tokens[tokens == 4] = 0  # 4 is the mask id
    huge = tokens + torch.where(tokens >= 5, 2**40, 0)  # order-preserving: window counts are kept
    common = dict(n_way=3, k_shot=2, n_query=2, mask_token_id=4, window_len=16, min_freq=2, max_freq=0.99)
    a = SMLMTSampler(**common, seed=1).sample(tokens, n_tasks=6)
    b = SMLMTSampler(**common, seed=1).sample(huge, n_tasks=6)
    assert torch.equal(a.support_windows, b.support_windows) and torch.equal(a.query_windows, b.query_windows)
    assert torch.equal(a.class_token_ids + torch.where(a.class_token_ids >= 5, 2**40, 0), b.class_token_ids)
    assert bool((b.class_token_ids >= 2**40).any())  # huge ids were drawn as classes


def test_without_numpy_the_index_and_the_episodes_are_the_same(zipf, monkeypatch):
    common = dict(n_way=4, k_shot=2, n_query=2, mask_token_id=2000, window_len=32, exclude_token_ids=(0, 5, 10**12))
    with_numpy = SMLMTSampler(**common, class_sampling="count_power", seed=2).sample(zipf, n_tasks=3)
    index = smlmt.build_index(zipf, 32)
    positions = index.positions(torch.tensor([0, 3, 1999, 10**12]))
    monkeypatch.setattr(smlmt, "_numpy_available", lambda: False)
    torch_index = smlmt.build_index(zipf, 32)
    for name in ("token_ids", "pair_windows", "offsets", "counts"):
        assert torch.equal(getattr(index, name), getattr(torch_index, name)), name
    assert torch.equal(torch_index.positions(torch.tensor([0, 3, 1999, 10**12])), positions)
    assert positions[-1] == -1
    without = SMLMTSampler(**common, class_sampling="count_power", seed=2).sample(zipf, n_tasks=3)
    for name in ("support_ids", "query_ids", "class_token_ids", "support_windows", "query_windows"):
        assert torch.equal(getattr(with_numpy, name), getattr(without, name)), name


# ---------------------------------------------------------------------- the fast paths against a plain reference
#
# build_index, assign_windows and assemble_episode run vectorised NumPy code (int32 sort keys, no torch op over
# the buffer); the reference below is the documented algorithm in plain Python, drawing from the generator in
# the same order and shapes. It shares only two things with the library: the exact repair (smlmt._repair, which
# is itself plain Python over lists) and nothing else.

_M32 = 0xFFFFFFFF


def reference_heldout(token: int, fraction: float, seed: int) -> bool:
    x = (token * 2654435761 + (seed & _M32) * 40503 + 0x9E3779B9) & _M32
    for _ in range(2):
        x ^= x >> 16
        x = (x * 0x045D9F3B) & _M32
    x ^= x >> 16
    return x / 2.0**32 < fraction


def reference_index(tokens: torch.Tensor, w: int) -> tuple[list[list[int]], dict[int, list[int]]]:
    """The windows, and for every token the ascending windows that hold it, by plain loops."""
    windows = naive_windows(tokens, w)
    where: dict[int, list[int]] = {}
    for j, win in enumerate(windows):
        for t in sorted(set(win)):
            where.setdefault(t, []).append(j)
    return windows, where


def reference_eligible(where: dict[int, list[int]], n_win: int, s: SMLMTSampler) -> list[int]:
    lo = s.min_freq * n_win if 0 < s.min_freq < 1 else s.min_freq
    hi = s.max_freq * n_win if 0 < s.max_freq < 1 else s.max_freq
    excluded = set(s.exclude_token_ids) | {s.mask_token_id}
    out = [t for t in sorted(where) if max(lo, s.per_class) <= len(where[t]) <= hi and t not in excluded]
    if s.holdout_fraction > 0:
        keep_held = s.class_split == "heldout"
        out = [t for t in out if reference_heldout(t, s.holdout_fraction, s.holdout_seed) == keep_held]
    return out


def reference_assign(where, classes, per, n_win, g):
    pairs = [(c, win) for c, t in enumerate(classes) for win in where[t]]  # by draw order, then window
    claims = [0] * n_win
    for _, win in pairs:
        claims[win] += 1
    prio = torch.rand(len(pairs), generator=g, dtype=torch.float64).tolist()
    by_class: list[list[tuple[bool, float, int]]] = [[] for _ in classes]
    for p, (c, win) in enumerate(pairs):
        by_class[c].append((claims[win] > 1, prio[p], win))  # uncontested first, then by priority
    chosen = [sorted(x)[:per] for x in by_class]
    flat = [win for x in chosen for _, _, win in x]
    if len(set(flat)) == len(flat):
        return torch.tensor([[win for _, _, win in sorted(x, key=lambda e: e[1])] for x in chosen])
    cand = [[win for _, win in sorted((pr, win) for _, pr, win in x)] for x in by_class]
    result = smlmt._repair(cand, [[win for _, _, win in x] for x in chosen], per)
    if result is None:
        return None
    out = torch.tensor(result, dtype=torch.long)
    return torch.gather(out, 1, torch.argsort(torch.rand(out.shape, generator=g), dim=1))


def reference_episode(tokens: torch.Tensor, s: SMLMTSampler, g: torch.Generator) -> dict | None:
    """One episode as plain tensors, or None where the sampler raises (too few classes, no placement)."""
    windows, where = reference_index(tokens, s.window_len)
    eligible = reference_eligible(where, len(windows), s)
    if len(eligible) < s.n_way:
        return None
    for _ in range(s.max_redraws):
        if s.class_sampling == "uniform":
            weights = torch.ones(len(eligible))
        else:
            weights = torch.tensor([len(where[t]) for t in eligible], dtype=torch.float64).pow(s.power)
        drawn = torch.multinomial(weights, s.n_way, replacement=False, generator=g).tolist()
        classes = [eligible[i] for i in drawn]
        assigned = reference_assign(where, classes, s.per_class, len(windows), g)
        if assigned is not None:
            break
    else:
        return None
    labels = torch.randperm(s.n_way, generator=g).tolist()
    by_label = sorted(range(s.n_way), key=lambda c: labels[c])
    out: dict[str, list] = {
        f"{p}_{x}": [] for p in ("support", "query") for x in ("ids", "labels", "mask", "windows")
    }
    out["class_token_ids"] = [classes[c] for c in by_label]
    for part, cols in (("support", range(s.k_shot)), ("query", range(s.k_shot, s.per_class))):
        for label, c in enumerate(by_label):
            for j in cols:
                win = int(assigned[c, j])
                row = windows[win]
                out[f"{part}_ids"].append([s.mask_token_id if x == classes[c] else x for x in row])
                out[f"{part}_mask"].append([x == classes[c] for x in row])
                out[f"{part}_labels"].append(label)
                out[f"{part}_windows"].append(win)
    return {k: torch.tensor(v) for k, v in out.items()}


EPISODE_FIELDS = (
    "support_ids", "support_labels", "support_mask", "query_ids", "query_labels", "query_mask",
    "class_token_ids", "support_windows", "query_windows",
)  # fmt: skip


def assert_matches_reference(tokens: torch.Tensor, s: SMLMTSampler, draws: int = 3) -> int:
    """Sample ``draws`` episodes and compare each, field by field and dtype, with the reference drawing from a
    generator in the same state; returns how many were episodes (the rest must be SamplingErrors in both)."""
    g = torch.Generator()
    n_episodes = 0
    for _ in range(draws):
        g.set_state(s.generator.get_state())
        expected = reference_episode(tokens, s, g)
        if expected is None:
            with pytest.raises(SamplingError):
                s.sample(tokens)
            continue
        ep = s.sample(tokens)
        for name in EPISODE_FIELDS:
            got = getattr(ep, name)
            assert got.dtype == expected[name].dtype and torch.equal(got, expected[name]), name
        assert torch.equal(s.generator.get_state(), g.get_state())  # the same draws, no more
        n_episodes += 1
    return n_episodes


REFERENCE_SETTINGS = [
    dict(n_way=8, k_shot=2, n_query=2, window_len=16),  # the defaults: min_freq=4 (count), max_freq=0.5 (fraction)
    dict(n_way=6, k_shot=3, n_query=1, window_len=16, min_freq=0.02, max_freq=40, class_sampling="count_power"),
    dict(n_way=5, k_shot=1, n_query=2, window_len=20, min_freq=0, max_freq=0.999, exclude_token_ids=(1, 2, 10**12)),
    dict(n_way=4, k_shot=2, n_query=2, window_len=16, holdout_fraction=0.3, holdout_seed=4),
    dict(n_way=4, k_shot=2, n_query=2, window_len=16, holdout_fraction=0.3, holdout_seed=4, class_split="heldout",
         class_sampling="count_power", power=1.5),
    dict(n_way=12, k_shot=3, n_query=2, window_len=8, min_freq=1, max_freq=1000),  # crowded: repairs and redraws
]  # fmt: skip


@pytest.mark.parametrize(
    "setting", REFERENCE_SETTINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())
)
@pytest.mark.parametrize("seed", [0, 1, 17])
def test_episodes_equal_the_plain_reference(setting, seed):
    g = torch.Generator().manual_seed(100 + seed)
    vocab = 60 if setting["window_len"] == 8 else 400
    tokens = zipf_tokens(12, 250, vocab, seed=seed)  # 250 % W != 0: the rows' tails are dropped
    tokens[tokens == vocab - 1] = int(torch.randint(3, 50, (), generator=g))  # vocab - 1 is the mask id
    s = SMLMTSampler(**setting, mask_token_id=vocab - 1, seed=seed)
    assert s.eligible(tokens).tolist() == reference_eligible(reference_index(tokens, s.window_len)[1],
                                                             12 * (250 // s.window_len), s)  # fmt: skip
    assert assert_matches_reference(tokens, s) > 0


def test_the_reference_comparison_covers_repairs_and_redraws(monkeypatch):
    calls = {"repair": 0, "failed": 0}
    repair = smlmt._repair

    def counting(cand, chosen, need):
        calls["repair"] += 1
        result = repair(cand, chosen, need)
        calls["failed"] += result is None
        return result

    monkeypatch.setattr(smlmt, "_repair", counting)
    episodes = 0
    for seed in range(3):  # 32 windows of 8 tokens, 5 classes x 4 windows from types in 4..8 windows
        tokens = zipf_tokens(4, 64, 30, seed=seed)
        tokens[tokens == 29] = 7
        s = SMLMTSampler(5, 2, 2, mask_token_id=29, window_len=8, min_freq=4, max_freq=8, seed=seed)
        episodes += assert_matches_reference(tokens, s, draws=6)
    # the slow path, redraws after a failed repair, and giving up after max_redraws all happened
    assert calls["repair"] >= 10 and calls["failed"] >= 10 and 0 < episodes < 18, (calls, episodes)


def test_fresh_batches_match_the_reference_at_benchmark_scale():
    """The headline setting of benchmarks/sampler.py (32-way, W=64, V=50k, fresh 64 x 2048 batches),
    on a quarter of the rows to keep the plain reference quick."""
    s = SMLMTSampler(32, 4, 4, mask_token_id=50_000, window_len=64, seed=5)
    for seed in (0, 1):
        tokens = zipf_tokens(16, 2048, 50_000, seed=seed)
        assert assert_matches_reference(tokens, s, draws=2) == 2


@FAST
@given(
    seed=st.integers(0, 10_000),
    vocab=st.integers(3, 40),
    rows=st.integers(1, 6),
    w=st.integers(2, 9),
    extra=st.integers(0, 8),
    n=st.integers(2, 5),
    k=st.integers(1, 3),
    q=st.integers(1, 2),
    band=st.sampled_from([(0, 0.9), (2, 0.5), (0.1, 20), (1, 1000), (3, 0.99)]),
    sampling=st.sampled_from(["uniform", "count_power"]),
    holdout=st.sampled_from([(0.0, "train"), (0.3, "train"), (0.3, "heldout")]),
)
def test_random_buffers_match_the_reference_and_the_torch_path(
    seed, vocab, rows, w, extra, n, k, q, band, sampling, holdout
):
    g = torch.Generator().manual_seed(seed)
    per_row = 1 + int(torch.randint(0, 6, (), generator=g))
    tokens = torch.randint(0, vocab, (rows, per_row * w + extra % w), generator=g)
    common = dict(
        n_way=n, k_shot=k, n_query=q, mask_token_id=vocab, window_len=w, min_freq=band[0], max_freq=band[1],
        exclude_token_ids=(1,), class_sampling=sampling, holdout_fraction=holdout[0], class_split=holdout[1],
        seed=seed,
    )  # fmt: skip
    s = SMLMTSampler(**common)
    event(f"episodes: {assert_matches_reference(tokens, s, draws=2)}")
    torch_only = SMLMTSampler(**common)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smlmt, "_numpy_available", lambda: False)
        torch_only.generator.set_state(SMLMTSampler(**common).generator.get_state())
        assert_matches_reference(tokens, torch_only, draws=2)


# ---------------------------------------------------------------------- edge cases of the fast index


@pytest.mark.parametrize("n_rows", [1, 6, 8])  # 6 windows: the multiply key; 8: shift keys up to the limit
def test_every_key_encoding_gives_the_plain_index(n_rows):
    # ids near the limits of each encoding: int32 shift (id < 2**(31 - b)), int64 shift, int64 multiply
    n = n_rows  # one window per row
    b = max(1, (n - 1).bit_length())
    top = (2**63 - n) // n
    huge = [2 ** (31 - b) - 1, 2 ** (31 - b), 2 ** (63 - b) - 1, top]
    for big in huge:
        g = torch.Generator().manual_seed(big % 1000)
        tokens = torch.randint(0, 5, (n_rows, 4), generator=g)
        tokens[0, 1] = big
        tokens[-1, 3] = big
        tokens[n_rows // 2, 0] = 2 ** (31 - b) - 2
        index = smlmt.build_index(tokens, window_len=4)
        _, where = reference_index(tokens, 4)
        assert index.token_ids.tolist() == sorted(where)
        assert [index.windows_of(t).tolist() for t in sorted(where)] == [where[t] for t in sorted(where)]
        assert index.counts.tolist() == [len(where[t]) for t in sorted(where)]
        assert index.offsets.tolist() == [0, *index.counts.cumsum(0).tolist()]
        for name in ("token_ids", "pair_windows", "offsets", "counts", "windows"):
            assert getattr(index, name).dtype == torch.long, name
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(smlmt, "_numpy_available", lambda: False)
            slow = smlmt.build_index(tokens, window_len=4)
        for name in ("token_ids", "pair_windows", "offsets", "counts", "windows"):
            assert torch.equal(getattr(index, name), getattr(slow, name)), (big, name)


def test_strided_and_tailed_buffers_index_like_their_contiguous_copy():
    base = zipf_tokens(10, 300, 500, seed=4)
    for tokens in (base[:, :250], base[::2], base.t().contiguous().t()[:, 5:290]):
        assert not tokens.is_contiguous() or tokens.shape[1] % 16
        a, b = smlmt.build_index(tokens, 16), smlmt.build_index(tokens.contiguous(), 16)
        for name in ("windows", "token_ids", "pair_windows", "offsets", "counts"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        s1, s2 = (SMLMTSampler(4, 2, 2, mask_token_id=500, window_len=16, seed=3) for _ in range(2))
        assert episodes_equal(s1.sample(tokens), s2.sample(tokens.contiguous()))
    assert base.equal(zipf_tokens(10, 300, 500, seed=4))  # the buffer itself is never written


def test_tokens_in_few_windows_and_the_band_edges():
    # 40 windows of W=10; token 100 + c (c = 0..9) sits at position c of c + 1 windows, so it is in exactly
    # c + 1 windows, and windows mix several classes; filler 0 elsewhere (excluded). k + q = 4.
    rows = [[0] * 10 for _ in range(40)]
    for c in range(10):
        for j in range(c + 1):
            rows[(4 * j + c % 4) % 40][c] = 100 + c
    tokens = torch.tensor([sum(rows, [])])
    _, where = reference_index(tokens, 10)
    assert {t: len(v) for t, v in where.items() if t} == {100 + c: c + 1 for c in range(10)}
    # counts, fractions of the 40 windows (0.1 -> 4, 0.2 -> 8, 0.175 -> 7), and both bounds inclusive
    for lo, hi, expected in [
        (0, 1000, range(103, 110)),  # tokens in 1..3 windows: fewer than k + q, never classes
        (5, 8, range(104, 108)),
        (4.0, 4.0, [103]),  # a one-count band: exactly k + q windows
        (6, 0.2, range(105, 108)),
        (0.1, 0.175, range(103, 107)),
        (0.1, 9, range(103, 109)),
        (10, 10, [109]),
        (11, 1000, []),
    ]:
        s = SMLMTSampler(
            2, 2, 2, mask_token_id=9, window_len=10, min_freq=lo, max_freq=hi, exclude_token_ids=(0,)
        )
        assert s.eligible(tokens).tolist() == list(expected), (lo, hi)
        if len(expected) >= 2:
            for _ in range(5):
                check_episode(s.sample(tokens), tokens, s)
        else:
            with pytest.raises(SamplingError, match=f"only {len(expected)} token types are eligible"):
                s.sample(tokens)
    # a class with exactly k + q windows takes every one of them
    s = SMLMTSampler(2, 2, 2, mask_token_id=9, window_len=10, min_freq=4, max_freq=5, exclude_token_ids=(0,))
    for _ in range(10):
        ep = s.sample(tokens)
        check_episode(ep, tokens, s)
        if 103 in ep.class_token_ids.tolist():
            label = ep.class_token_ids.tolist().index(103)
            used = ep.support_windows[ep.support_labels == label].tolist()
            used += ep.query_windows[ep.query_labels == label].tolist()
            assert sorted(used) == where[103]


def test_a_token_in_one_window_only_and_a_single_window_buffer():
    tokens = torch.tensor([[7, 7, 3, 4]])  # one window
    index = smlmt.build_index(tokens, 4)
    assert index.token_ids.tolist() == [3, 4, 7] and index.counts.tolist() == [1, 1, 1]
    assert index.pair_windows.tolist() == [0, 0, 0] and index.offsets.tolist() == [0, 1, 2, 3]
    s = SMLMTSampler(2, 1, 1, mask_token_id=9, window_len=4, min_freq=0, max_freq=1000)
    with pytest.raises(SamplingError, match="only 0 token types are eligible"):
        s.sample(tokens)


def test_a_fresh_tensor_and_a_cached_index_give_the_same_episodes(zipf):
    a = SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, seed=9)
    b = SMLMTSampler(8, 2, 2, mask_token_id=2000, window_len=32, seed=9)
    index = b.index(zipf)
    for _ in range(4):
        fresh = zipf.clone()  # a new tensor every call: the index is rebuilt
        assert episodes_equal(a.sample(fresh), b.sample(index))
        assert a.index(fresh) is not index


def test_padding_is_never_a_class_nor_inside_a_window() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 40, (32, 64), generator=g)
    lengths = torch.randint(8, 64, (32,), generator=g)
    pad = 1
    rows[torch.arange(64).expand(32, -1) >= lengths.unsqueeze(1)] = pad  # right-padded rows of ragged length
    plain = SMLMTSampler(n_way=4, k_shot=2, n_query=2, mask_token_id=2, window_len=8, max_freq=0.9, seed=0)
    padded = SMLMTSampler(n_way=4, k_shot=2, n_query=2, mask_token_id=2, window_len=8, max_freq=0.9, seed=0,
                          pad_token_id=pad)  # fmt: skip
    assert pad in plain.eligible(rows).tolist()  # without a pad id, padding is a token like any other
    assert pad not in padded.eligible(rows).tolist()
    index = padded.index(rows)
    assert index.usable_windows == int((index.windows != pad).all(1).sum()) < index.n_windows
    for _ in range(20):
        ep = padded.sample(rows, n_tasks=2)
        assert not (ep.support_ids == pad).any() and not (ep.query_ids == pad).any()
        assert pad not in ep.class_token_ids.tolist()
    with pytest.raises(ValueError, match="pad_token_id: must differ from mask_token_id"):
        SMLMTSampler(n_way=4, k_shot=2, n_query=2, mask_token_id=2, window_len=8, pad_token_id=2)
    with pytest.raises(ValueError, match="every window of 8 tokens holds the pad id"):
        padded.sample(torch.full((2, 16), pad))
