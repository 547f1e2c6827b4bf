"""RowBatcher: seeded epochs over in-memory rows, exact resume, and per-rank slices of the global batch."""

from __future__ import annotations

import re

import pytest
import torch

from picomaml.data.row_batcher import RowBatcher

R, L = 23, 5  # 23 rows: with batch 4 there are 5 full batches and a dropped tail of 3


def make_rows() -> torch.Tensor:
    return torch.arange(R * L).view(R, L)  # row i starts with i * L, so a row names itself


def row_ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] // L).tolist()


def take(b: RowBatcher, n: int) -> list[list[int]]:
    return [row_ids(b.next_global()) for _ in range(n)]


def test_first_epoch_is_the_seeded_permutation_in_order():
    b = RowBatcher(make_rows(), batch_size=4, seed=3)
    order = torch.randperm(R, generator=torch.Generator().manual_seed(3)).tolist()
    assert b.batches_per_epoch == 5
    assert take(b, 5) == [order[i : i + 4] for i in range(0, 20, 4)]


def test_an_epoch_uses_each_row_at_most_once_and_drops_the_tail():
    b = RowBatcher(make_rows(), batch_size=4, seed=0)
    seen = [i for batch in take(b, b.batches_per_epoch) for i in batch]
    assert len(seen) == len(set(seen)) == 20


def test_data_never_ends_and_each_epoch_reshuffles_with_seed_plus_epoch():
    b = RowBatcher(make_rows(), batch_size=4, seed=3)
    take(b, 5)
    second = take(b, 5)  # past the end of the rows: a new epoch, not StopIteration
    assert b.epoch == 1 and b.position == 5
    order = torch.randperm(R, generator=torch.Generator().manual_seed(4)).tolist()
    assert second == [order[i : i + 4] for i in range(0, 20, 4)]
    assert take(b, 1) and b.epoch == 2 and b.position == 1


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = (RowBatcher(make_rows(), 4, seed=s) for s in (7, 7, 8))
    first = take(a, 12)
    assert take(b, 12) == first
    assert take(c, 12) != first


def test_global_batch_holds_full_rows():
    rows = make_rows()
    batch = RowBatcher(rows, 4, seed=1).next_global()
    assert batch.shape == (4, L) and batch.dtype == rows.dtype
    for row in batch:
        assert torch.equal(row, rows[int(row[0]) // L])


@pytest.mark.parametrize("taken", [0, 3, 5, 7, 10])  # fresh, mid-epoch, at the epoch boundary, later ones
def test_state_dict_resumes_the_exact_next_batches(taken):
    original = RowBatcher(make_rows(), 4, seed=11)
    take(original, taken)
    state = original.state_dict()
    assert all(isinstance(v, int) for v in state.values())  # plain values: checkpoint-safe
    resumed = RowBatcher(make_rows(), 4, seed=0)  # a different seed: the state's seed wins
    resumed.load_state_dict(state)
    assert take(resumed, 8) == take(original, 8)


def test_resume_rejects_another_batch_size():
    state = RowBatcher(make_rows(), 4).state_dict()
    with pytest.raises(ValueError, match="checkpoint batch_size 4 != current 2"):
        RowBatcher(make_rows(), 2).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_share_the_global_batch_and_split_it_into_disjoint_slices(world_size):
    batchers = [RowBatcher(make_rows(), 4, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(7):
        globals_ = [b.next_global() for b in batchers]
        assert all(torch.equal(g, globals_[0]) for g in globals_)  # same global batch on every rank
        slices = [b.local(g) for b, g in zip(batchers, globals_, strict=True)]
        assert all(s.shape == (4 // world_size, L) for s in slices)
        ids = [i for s in slices for i in row_ids(s)]
        assert ids == row_ids(globals_[0])  # contiguous, in rank order, disjoint, covering the batch


def test_global_batches_do_not_depend_on_world_size():
    single = take(RowBatcher(make_rows(), 4, seed=2), 9)
    assert take(RowBatcher(make_rows(), 4, seed=2, rank=1, world_size=2), 9) == single


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": torch.zeros(5, dtype=torch.long)}, r"rows must be \(num_rows, seq_len\), got shape \(5,\)"),
        ({"batch_size": 0}, r"batch_size must be in \[1, 23\]"),
        ({"batch_size": 24}, r"batch_size must be in \[1, 23\] \(the number of rows\), got 24"),
        ({"world_size": 3}, "batch_size 4 must be divisible by world_size 3"),
        ({"world_size": 0}, "must be divisible by world_size 0"),
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, 2\), got 2"),
        ({"rank": -1, "world_size": 2}, r"rank must be in \[0, 2\), got -1"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    args = {"rows": make_rows(), "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        RowBatcher(**args)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("position", -5, "data position 'position': must be an integer >= 0 and <= 5, got -5"),
        ("position", 10**12, "data position 'position': must be an integer >= 0 and <= 5, got 1000000000000"),
        ("epoch", -1, "data position 'epoch'"),
        ("seed", "x", "data position 'seed'"),
    ],
)
def test_a_saved_position_outside_the_rows_is_refused(key, value, message):
    batcher = RowBatcher(torch.arange(40).reshape(20, 2), batch_size=4)
    state = batcher.state_dict() | {key: value}
    with pytest.raises(ValueError, match=re.escape(message)):
        batcher.load_state_dict(state)
    with pytest.raises(KeyError, match="missing keys"):
        batcher.load_state_dict({"batch_size": 4})
