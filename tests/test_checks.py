"""Value checks without host syncs after their first pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from picomaml.checks import check_values


class Reads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every ``.item()`` / ``bool()`` of a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_a_check_reads_until_it_passed_once_then_queues_an_assert() -> None:
    owner = nn.Linear(1, 1)
    good, bad = torch.tensor([1, 2]), torch.tensor([1, -2])
    msg = lambda x: (lambda: f"ids: must be >= 0, got min {int(x.min())}")  # noqa: E731
    with pytest.raises(ValueError, match="got min -2"):
        check_values(owner, "k", bad >= 0, msg(bad), "ids: must be >= 0")  # not passed yet: read, detailed
    with Reads() as reads:
        check_values(owner, "k", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 1  # the first pass reads
    with Reads() as reads:
        check_values(owner, "k", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 0  # afterwards nothing is read
    with pytest.raises(ValueError, match="got min -2"):  # on the CPU the queued assert fails at once
        check_values(owner, "k", bad >= 0, msg(bad), "ids: must be >= 0")
    with Reads() as reads:
        check_values(owner, "other shape", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 1  # another key is read again
    with Reads() as reads:
        check_values(None, "k", good >= 0, msg(good), "ids: must be >= 0")
        check_values(None, "k", good >= 0, msg(good), "ids: must be >= 0")
    assert reads.count == 2  # no owner: read every time
