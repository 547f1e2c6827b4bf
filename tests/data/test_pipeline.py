"""build_training_data: tokenizer, held-out rows and a resumable, rank-aware batch source per data source."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from picomaml.data.corpus import load_default_corpus
from picomaml.data.pipeline import DataConfig, StreamBatches, build_training_data
from picomaml.data.row_batcher import RowBatcher
from picomaml.params import ConfigError

pytest.importorskip("tokenizers")

SEQ = 8  # rows carry SEQ + 1 tokens
ROW = SEQ + 1


def as_set(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


# -- embedded corpus -----------------------------------------------------------------------------------


@pytest.fixture
def embedded(corpus_build):
    """``make(**overrides)``: a DataConfig for the embedded corpus cached once per session."""
    _, root, _ = corpus_build

    def make(**overrides) -> DataConfig:
        return DataConfig(
            **{"source": "embedded", "seq_len": SEQ, "batch_size": 4, "cache_dir": str(root), **overrides}
        )

    return make


def test_embedded_rows_tokenizer_and_heldout(embedded):
    cfg = embedded()
    data = build_training_data(cfg, seed=3, eval_rows=8)
    corpus = load_default_corpus(seq_len=ROW, cache_dir=cfg.cache_dir)
    assert data.train.shared
    batch = data.train.next_batch()
    assert batch.shape == (4, ROW) and batch.dtype == torch.long
    # the training rows are the train split in the seeded order; held-out rows are the held-out split
    torch.testing.assert_close(batch, RowBatcher(corpus.train_rows, 4, seed=3).next_global())
    torch.testing.assert_close(data.heldout_rows, corpus.heldout_rows[:8])
    assert data.tokenizer.mask_token_id == 2 and data.tokenizer.vocab_size == corpus.tokenizer.vocab_size
    assert {0, 1, 2} <= set(data.special_ids)  # eos, pad, mask never become SMLMT classes


def test_embedded_seed_changes_the_order_only(embedded):
    a, b, c = (build_training_data(embedded(), seed=s).train for s in (0, 0, 1))
    first = [a.next_batch() for _ in range(3)]
    assert all(torch.equal(x, b.next_batch()) for x in first)
    assert not torch.equal(first[0], c.next_batch())


def test_data_seed_sets_the_order_whatever_the_experiment_seed(embedded):
    """``data.seed``: a run with its own data order (the rest of the run keeps the experiment's seed)."""
    own = build_training_data(embedded(seed=7), seed=0).train.next_batch()
    assert torch.equal(own, build_training_data(embedded(), seed=7).train.next_batch())
    assert torch.equal(own, build_training_data(embedded(seed=7), seed=3).train.next_batch())
    assert not torch.equal(own, build_training_data(embedded(), seed=0).train.next_batch())


def test_embedded_ranks_share_the_global_batch_and_take_disjoint_rows(embedded):
    sources = [build_training_data(embedded(), rank=r, world_size=2).train for r in range(2)]
    for _ in range(3):
        b0, b1 = (s.next_batch() for s in sources)
        assert torch.equal(b0, b1)  # one global batch, so episodes are the same on every rank
        l0, l1 = sources[0].local(b0), sources[1].local(b1)
        assert l0.shape == l1.shape == (2, ROW)
        assert as_set(l0).isdisjoint(as_set(l1))
        assert torch.equal(torch.cat([l0, l1]), b0)


def test_embedded_state_dict_resumes_the_exact_next_batch(embedded):
    original = build_training_data(embedded(), seed=5).train
    for _ in range(3):
        original.next_batch()
    state = original.state_dict()
    resumed = build_training_data(embedded(), seed=5).train
    resumed.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(resumed.next_batch(), original.next_batch())


def test_batch_size_not_divisible_by_devices_names_the_key(embedded):
    with pytest.raises(ConfigError, match="data.batch_size: 6 must be divisible by the 4 devices"):
        build_training_data(embedded(batch_size=6), world_size=4)


def test_batch_size_above_the_rows_names_the_key(embedded):
    with pytest.raises(
        ConfigError, match=r"data.batch_size: 1000000 exceeds the \d+ training rows of 9 tokens"
    ):
        build_training_data(embedded(batch_size=1_000_000))


# -- local files ---------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer_file(tmp_path, _small_tokenizer_json):
    path = tmp_path / "tokenizer.json"
    path.write_text(_small_tokenizer_json, encoding="utf-8")
    return str(path)


def write_jsonl(path, n_rows: int, start: int = 0) -> str:
    """``n_rows`` rows' worth of pretokenized ids, numbered from ``start`` so every row is unique."""
    ids = list(range(start, start + n_rows * ROW))
    path.write_text("\n".join(json.dumps({"input_ids": ids[i : i + 50]}) for i in range(0, len(ids), 50)))
    return str(path)


def test_local_needs_a_tokenizer():
    with pytest.raises(ConfigError, match="data.tokenizer: source 'local' needs a tokenizer"):
        build_training_data(DataConfig(source="local", paths=["never-read.jsonl"]))


def test_local_without_eval_paths_holds_out_the_last_rows(tmp_path, tokenizer_file, caplog):
    cfg = DataConfig(
        source="local",
        paths=[write_jsonl(tmp_path / "a.jsonl", 40)],
        tokenizer=tokenizer_file,
        seq_len=SEQ,
        batch_size=4,
    )
    with caplog.at_level(logging.WARNING, logger="picomaml.data.pipeline"):
        data = build_training_data(cfg, eval_rows=8)
    assert "data.eval_paths is empty: the last 8 training rows are held out" in caplog.text
    rows = torch.arange(40 * ROW).view(40, ROW)
    torch.testing.assert_close(data.heldout_rows, rows[32:])
    seen = torch.cat([data.train.next_batch() for _ in range(8)])  # one epoch of the 32 remaining rows
    assert as_set(seen) == as_set(rows[:32])


def test_local_eval_paths_give_the_heldout_rows(tmp_path, tokenizer_file):
    cfg = DataConfig(
        source="local",
        paths=[write_jsonl(tmp_path / "a.jsonl", 12)],
        tokenizer=tokenizer_file,
        eval_paths=[write_jsonl(tmp_path / "b.jsonl", 6, start=10_000)],
        seq_len=SEQ,
        batch_size=4,
    )
    data = build_training_data(cfg, eval_rows=4)
    torch.testing.assert_close(data.heldout_rows, torch.arange(10_000, 10_000 + 4 * ROW).view(4, ROW))
    assert data.tokenizer.mask_token_id is not None and data.tokenizer.mask_token_id in data.special_ids
    seen = torch.cat([data.train.next_batch() for _ in range(3)])  # all 12 rows train, none held out
    assert as_set(seen) == as_set(torch.arange(12 * ROW).view(12, ROW))


def test_local_with_no_eval_rows_trains_on_every_row(tmp_path, tokenizer_file):
    cfg = DataConfig(
        source="local",
        paths=[write_jsonl(tmp_path / "a.jsonl", 12)],
        tokenizer=tokenizer_file,
        seq_len=SEQ,
        batch_size=4,
    )
    data = build_training_data(cfg, eval_rows=0)
    assert data.heldout_rows.shape == (0, ROW)
    seen = torch.cat([data.train.next_batch() for _ in range(3)])
    assert as_set(seen) == as_set(torch.arange(12 * ROW).view(12, ROW))


def test_negative_eval_rows_is_rejected(embedded):
    with pytest.raises(ValueError, match="eval_rows must be >= 0, got -1"):
        build_training_data(embedded(), eval_rows=-1)


# -- pretokenized parquet (the "hf" source, here from local files) --------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 parquet shards of 5 stored rows of 2 * ROW tokens; ids encode (shard, row, position)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("pretokenized")
    for shard in range(4):
        rows = [[shard * 10_000 + row * 100 + pos for pos in range(2 * ROW)] for row in range(5)]
        pq.write_table(pa.table({"input_ids": rows}), root / f"train-{shard:05d}.parquet")
    return sorted(str(p) for p in root.iterdir())


def hf_cfg(shards, tokenizer_file, **overrides) -> DataConfig:
    return DataConfig(
        **{
            "source": "hf",
            "paths": shards,
            "tokenizer": tokenizer_file,
            "seq_len": SEQ,
            "batch_size": 4,
            **overrides,
        }
    )


def drain(source: StreamBatches) -> list[torch.Tensor]:
    out = []
    while True:
        try:
            out.append(source.next_batch())
        except StopIteration:
            return out


def test_hf_needs_a_tokenizer():
    with pytest.raises(
        ConfigError, match="data.tokenizer: source 'hf' needs the tokenizer the data was made with"
    ):
        build_training_data(DataConfig(source="hf"))


def test_hf_ranks_stream_disjoint_shards_of_the_data(shards, tokenizer_file):
    everything = as_set(torch.cat(drain(build_training_data(hf_cfg(shards, tokenizer_file)).train)))
    assert len(everything) == 4 * 5 * 2  # two windows of ROW tokens per stored row, all distinct
    parts = []
    for rank in range(2):
        source = build_training_data(hf_cfg(shards, tokenizer_file), rank=rank, world_size=2).train
        assert not source.shared
        batches = drain(source)
        assert all(b.shape == (2, ROW) for b in batches)  # this rank's share of the global batch of 4
        assert torch.equal(source.local(batches[0]), batches[0])
        parts.append(as_set(torch.cat(batches)))
    assert parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == everything


def test_hf_state_dict_resumes_the_exact_next_batch(shards, tokenizer_file):
    reference = drain(build_training_data(hf_cfg(shards, tokenizer_file)).train)
    original = build_training_data(hf_cfg(shards, tokenizer_file)).train
    for _ in range(3):
        original.next_batch()
    resumed = build_training_data(hf_cfg(shards, tokenizer_file)).train
    resumed.load_state_dict(original.state_dict())
    rest = drain(resumed)
    assert len(rest) == len(reference) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[3:], strict=True))
    # loading into a source that is mid-iteration restarts its iterator at the loaded position
    original.load_state_dict({**original.state_dict(), "rows_consumed": 0, "windows_into_row": 0})
    assert torch.equal(original.next_batch(), reference[0])


def test_hf_eval_paths_give_the_heldout_rows(shards, tokenizer_file):
    data = build_training_data(
        hf_cfg(shards, tokenizer_file, paths=shards[:3], eval_paths=shards[3:]), eval_rows=4
    )
    assert data.heldout_rows.shape == (4, ROW)
    assert set(data.heldout_rows[:, 0].div(10_000, rounding_mode="floor").tolist()) == {3}  # the eval shard
    assert torch.equal(data.heldout_rows[0], torch.arange(30_000, 30_000 + ROW))


def test_hf_without_eval_data_evaluates_on_the_first_training_rows(shards, tokenizer_file, caplog):
    with caplog.at_level(logging.WARNING, logger="picomaml.data.pipeline"):
        data = build_training_data(hf_cfg(shards, tokenizer_file), eval_rows=3)
    assert "evaluating on the first training rows" in caplog.text
    first = build_training_data(hf_cfg(shards, tokenizer_file, batch_size=3)).train.next_batch()
    torch.testing.assert_close(data.heldout_rows, first)
