"""accuracy: the one accuracy of the library, on logits or predicted labels, overall or per task."""

from __future__ import annotations

import pytest
import torch

from picomaml.meta.functional import accuracy


def test_accuracy_of_logits_and_of_predictions():
    logits = torch.tensor([[[0.1, 0.9], [0.8, 0.2]], [[0.3, 0.7], [0.6, 0.4]]])  # (T=2, n=2, N=2)
    labels = torch.tensor([[1, 1], [1, 0]])
    assert accuracy(logits, labels).item() == 0.75
    assert accuracy(logits, labels, per_task=True).tolist() == [0.5, 1.0]
    pred = logits.argmax(-1)
    assert accuracy(pred, labels).item() == 0.75  # predicted labels give the same numbers
    assert accuracy(pred, labels, per_task=True).tolist() == [0.5, 1.0]
    assert accuracy(pred[0], labels[0], per_task=True).dim() == 0  # a single task: one number
    ties = torch.zeros(1, 3)
    assert accuracy(ties, torch.tensor([0])).item() == 1.0  # ties go to the lowest index


def test_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="scores"):
        accuracy(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="scores"):
        accuracy(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
