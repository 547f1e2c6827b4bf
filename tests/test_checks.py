"""Value checks without host syncs after their first pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from picomaml.checks import SyncCounter, check_values


def test_a_check_reads_until_it_passed_once_then_queues_an_assert() -> None:
    owner = nn.Linear(1, 1)
    good, bad = torch.tensor([1, 2]), torch.tensor([1, -2])
    msg = lambda x: (lambda: f"ids: must be >= 0, got min {int(x.min())}")  # noqa: E731
    with pytest.raises(ValueError, match="got min -2"):
        check_values(owner, "k", bad >= 0, msg(bad), "ids: must be >= 0")  # not passed yet: read, detailed
    with SyncCounter() as reads:
        check_values(owner, "k", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 1  # the first pass reads
    with SyncCounter() as reads:
        check_values(owner, "k", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 0  # afterwards nothing is read
    with pytest.raises(ValueError, match="got min -2"):  # on the CPU the queued assert fails at once
        check_values(owner, "k", bad >= 0, msg(bad), "ids: must be >= 0")
    with SyncCounter() as reads:
        check_values(owner, "other shape", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 1  # another key is read again
    with SyncCounter() as reads:
        check_values(None, "k", good >= 0, msg(good), "ids: must be >= 0")
        check_values(None, "k", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 2  # no owner: read every time


def test_the_sync_counter_sees_every_kind_of_read():
    x = torch.arange(4.0)
    originals = (torch.Tensor.tolist, torch.Tensor.numpy)
    with SyncCounter() as c:
        x.sum().item()
        bool(x.any())
        x.tolist()
        x.numpy()
    assert c.count == 4
    with SyncCounter() as c:
        (x * 2).sum()  # queued work, nothing read
    assert c.count == 0
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == originals  # the wrapped methods are given back
