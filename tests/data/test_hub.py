from __future__ import annotations

import warnings

import pytest
import torch

from picomaml.data.hub import PretokenizedStream

pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROW_LEN = 9  # a miniature of Dolma's 2,049-token rows
ROWS_PER_SHARD = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 parquet shards; token ids encode (shard, row, position) so every window is unique."""
    root = tmp_path_factory.mktemp("dolma-like")
    for shard in range(4):
        rows = [[shard * 10_000 + row * 100 + pos for pos in range(ROW_LEN)] for row in range(ROWS_PER_SHARD)]
        pq.write_table(pa.table({"input_ids": rows}), root / f"train-{shard:05d}.parquet")
    return root


def _all_rows(stream):
    return [tuple(r) for b in stream for r in b.tolist()]


def test_batches_shape_dtype_and_modes(shards):
    stream = PretokenizedStream(data_files=shards, seq_len=4, batch_size=3)
    batches = list(stream)
    assert all(b.shape == (3, 4) and b.dtype == torch.long for b in batches)
    rows = _all_rows(batches)
    assert len(rows) == 4 * ROWS_PER_SHARD * 2 // 3 * 3  # 2 windows per stored row, full batches only
    assert rows[0] == (0, 1, 2, 3) and rows[1] == (4, 5, 6, 7) and rows[2] == (100, 101, 102, 103)
    trunc = _all_rows(PretokenizedStream(data_files=shards, seq_len=4, batch_size=2, mode="truncate"))
    assert len(trunc) == 4 * ROWS_PER_SHARD and trunc[1] == (100, 101, 102, 103)
    whole = _all_rows(PretokenizedStream(data_files=shards, seq_len=ROW_LEN, batch_size=1))
    assert len(whole) == 4 * ROWS_PER_SHARD and len(whole[0]) == ROW_LEN


def test_two_ranks_disjoint_by_files_and_complete(shards):
    everything = set(_all_rows(PretokenizedStream(data_files=shards, seq_len=3, batch_size=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 shards over 2 ranks: file sharding, no fallback warning
        parts = [set(_all_rows(PretokenizedStream(data_files=shards, seq_len=3, batch_size=1, rank=r, world_size=2)))
                 for r in range(2)]  # fmt: skip
    assert parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == everything
    shards_of = [{row[0] // 10_000 for row in part} for part in parts]
    assert shards_of[0].isdisjoint(shards_of[1])  # whole files per rank


def test_three_ranks_fall_back_to_rows_with_warning(shards):
    everything = set(_all_rows(PretokenizedStream(data_files=shards, seq_len=3, batch_size=1)))
    parts = []
    for rank in range(3):
        with pytest.warns(UserWarning, match="do not divide"):
            stream = PretokenizedStream(data_files=shards, seq_len=3, batch_size=1, rank=rank, world_size=3)
            parts.append(set(_all_rows(stream)))
    assert sum(len(p) for p in parts) == len(everything) and set().union(*parts) == everything


@pytest.mark.parametrize("stop_after", [1, 2, 5])
def test_resume_continues_exactly(shards, stop_after):
    kwargs = {"data_files": shards, "seq_len": 4, "batch_size": 3, "rank": 1, "world_size": 2}
    reference = list(PretokenizedStream(**kwargs))
    stream = PretokenizedStream(**kwargs)
    it = iter(stream)
    for _ in range(stop_after):
        next(it)
    state = stream.state_dict()
    assert state["rows_consumed"] * 2 + state["windows_into_row"] == stop_after * 3
    resumed = PretokenizedStream(**kwargs)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - stop_after
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[stop_after:], strict=True))
    # another batch size continues from the same window
    regrouped = PretokenizedStream(**{**kwargs, "batch_size": 1})
    regrouped.load_state_dict(state)
    assert torch.equal(next(iter(regrouped))[0], reference[stop_after][0])


def test_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="rank must be in"):
        PretokenizedStream(data_files=shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        PretokenizedStream(data_files=shards, mode="windows")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PretokenizedStream(data_files=tmp_path / "missing.parquet")
    with pytest.raises(KeyError, match="columns found"):
        list(PretokenizedStream(data_files=shards, column="tokens"))
    stream = PretokenizedStream(data_files=shards, seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        stream.load_state_dict({**stream.state_dict(), "seq_len": 8})
    with pytest.warns(UserWarning, match="shorter than seq_len"):
        assert list(PretokenizedStream(data_files=shards, seq_len=ROW_LEN + 1)) == []
