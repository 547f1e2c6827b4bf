"""The machinery shared by the fine-tuning evaluations of [`picomaml.eval.finetune`][picomaml.eval.finetune]:
examples as token ids and scored rows, their features, the training loop and the argument checks.

Both tasks reduce to the same problem: each example (a sentence or a text) owns some rows (its scored words,
or one pooled vector), each row has a class, and a linear head is trained over the rows' features by AdamW.
In ``"head"`` mode the frozen backbone's features are computed once and cached; in ``"full"`` mode a copy of
the backbone runs every step.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from picomaml.eval.fewshot import eval_mode
from picomaml.meta.backbone import backbone_hidden, hidden_size, unwrap_model, vocab_size
from picomaml.meta.features import pool_features
from picomaml.params import check_int, check_number, short_repr

logger = logging.getLogger("picomaml.eval.finetune")

FINETUNE_MODES = ("head", "full")
# Adam on a lone linear head tolerates a large step; the whole network needs a small one
DEFAULT_LR = {"head": 1e-3, "full": 1e-4}
DEFAULT_MAX_LEN = 512  # when neither max_len nor the model's config gives a length limit


@dataclass
class Encoded:
    """Examples as token ids and the rows the head scores: one per scored word (tagging) or per text."""

    ids: list[list[int]]
    positions: list[list[int]] | None  # tagging: the scored positions of each example; None: one pooled row
    targets: Tensor  # (n_rows,) long, rows in example order
    offsets: Tensor  # (n_examples + 1,) long: example i owns rows offsets[i]:offsets[i+1]


def make_encoded(ids: list[list[int]], positions: list[list[int]] | None, targets: list[int]) -> Encoded:
    """An `Encoded` with the row offsets of its examples."""
    counts = [len(p) for p in positions] if positions is not None else [1] * len(ids)
    offsets = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
    return Encoded(ids, positions, torch.tensor(targets, dtype=torch.long), offsets)


def example_rows(enc: Encoded, idx: Tensor) -> Tensor:
    """Row indices ``(n_rows,)`` of examples ``idx``, in their order."""
    parts = [torch.arange(int(enc.offsets[i]), int(enc.offsets[i + 1])) for i in idx.tolist()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def row_features(
    model: nn.Module, enc: Encoded, idx: Tensor, pad_id: int, pooling: str, device: Any
) -> Tensor:
    """Head inputs ``(n_rows, D)`` float32 of examples ``idx``: one backbone forward over them, right-padded."""
    batch = [enc.ids[i] for i in idx.tolist()]
    ids = torch.full((len(batch), max(map(len, batch))), pad_id, dtype=torch.long)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    for b, seq in enumerate(batch):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        valid[b, : len(seq)] = True
    hidden = backbone_hidden(model, ids.to(device))  # (B, L, D)
    if enc.positions is None:
        return pool_features(hidden, None, pooling, valid=valid.to(device)).float()
    rows = [b for b, i in enumerate(idx.tolist()) for _ in enc.positions[i]]
    cols = [p for i in idx.tolist() for p in enc.positions[i]]
    return hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)].float()


def chunks(n: int, size: int) -> list[Tensor]:
    """Example indices ``0 .. n-1`` in consecutive batches of ``size``."""
    return list(torch.arange(n).split(size))


def first_examples(enc: Encoded, k: int) -> Encoded:
    """The first ``k`` examples of ``enc``, without targets (to probe the feature width)."""
    return make_encoded(enc.ids[:k], enc.positions[:k] if enc.positions is not None else None, [])


@contextlib.contextmanager
def train_mode(module: nn.Module) -> Iterator[None]:
    """Train mode for the block, eval mode after it (only ever the copy made for full fine-tuning)."""
    module.train()
    try:
        yield
    finally:
        module.eval()


def fit_predict(
    backbone: nn.Module, train: Encoded, test: Encoded, n_classes: int, *, mode: str, epochs: int, lr: float,
    batch_size: int, eval_batch_size: int, seed: int, device: Any, pad_id: int, pooling: str,
    weight_decay: float, max_grad_norm: float | None,
) -> tuple[Tensor, float]:  # fmt: skip
    """Train a linear head (and, in ``"full"`` mode, a copy of the backbone); return the predicted class of
    every test row ``(n_test_rows,)`` and the mean loss of the last epoch."""
    gen = torch.Generator().manual_seed(seed)
    model = unwrap_model(backbone)
    first = next(iter(model.parameters()), None)
    moved = first is not None and (first.device.type, first.device.index or 0) != (
        device.type,
        device.index or 0,
    )
    if mode == "full" or moved:
        model = copy.deepcopy(model).to(device)  # the caller's model stays as it is
    targets = train.targets.to(device)
    n = len(train.ids)

    def feats(enc: Encoded, idx: Tensor) -> Tensor:
        return row_features(model, enc, idx, pad_id, pooling, device)

    def all_feats(enc: Encoded) -> Tensor:
        with torch.no_grad(), eval_mode(model):
            return torch.cat([feats(enc, c) for c in chunks(len(enc.ids), eval_batch_size)])

    cached = all_feats(train) if mode == "head" else None
    if cached is not None:
        dim = cached.shape[-1]
    else:  # the width from the config, or from one probe forward
        dim = hidden_size(model) or all_feats(first_examples(train, 1)).shape[-1]
    # a lone linear layer needs no symmetry breaking: zeros keep it seed-free, and skip_init leaves the
    # global RNG untouched (nn.Linear's own init would draw from it)
    head = torch.nn.utils.skip_init(nn.Linear, dim, n_classes, device=device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if mode == "full":
        model.requires_grad_(True)
        params = [*model.parameters(), *head.parameters()]
    else:
        params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    with eval_mode(model) if mode == "head" else train_mode(model):
        for epoch in range(epochs):
            losses = []
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                rows = example_rows(train, idx).to(device)
                if rows.numel() == 0:  # every word of these sentences was cut off
                    continue
                x = cached[rows] if cached is not None else feats(train, idx)
                loss = F.cross_entropy(head(x), targets[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
            logger.debug(
                "fine-tune (%s) epoch %d: loss %.4f", mode, epoch + 1, sum(losses) / max(len(losses), 1)
            )
    with torch.no_grad():
        pred = head(all_feats(test)).argmax(-1).cpu()
    return pred, (sum(losses) / len(losses) if losses else float("nan"))


# -- checks --------------------------------------------------------------------------------------------------


def check_common(
    backbone: Any, tokenizer: Any, mode: str, epochs: int, lr: float | None, batch_size: int, seed: int,
    max_len: int | None, eval_batch_size: int, weight_decay: float, max_grad_norm: float | None,
) -> tuple[float, int]:  # fmt: skip
    """Check the arguments both fine-tunes share (errors name the argument); return the learning rate and
    the length limit (``max_len``, or the model's positions when None)."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone: must be a torch.nn.Module, got {type(backbone).__name__}")
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer: needs encode(text) -> list[int], got {type(tokenizer).__name__}")
    if mode not in FINETUNE_MODES:
        raise ValueError(f"mode: must be one of {list(FINETUNE_MODES)}, got {mode!r}")
    check_int("epochs", epochs, ge=1)
    check_int("batch_size", batch_size, ge=1)
    check_int("eval_batch_size", eval_batch_size, ge=1)
    check_int("seed", seed, ge=0)
    check_number("weight_decay", weight_decay, ge=0)
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, gt=0)
    lr = check_number("lr", lr, gt=0) if lr is not None else DEFAULT_LR[mode]
    config = getattr(unwrap_model(backbone), "config", None)
    limit = getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
    if max_len is None:  # batches are padded to their longest example, so a long limit costs nothing
        return lr, limit or DEFAULT_MAX_LEN
    check_int("max_len", max_len, ge=1)
    if limit is not None and max_len > limit:
        raise ValueError(f"max_len: {max_len} is longer than the model's {limit} positions")
    return lr, max_len


def check_examples(name: str, data: Any, kind: type) -> None:
    """Raise unless ``data`` is a non-empty sequence of ``kind``."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or len(data) == 0:
        raise ValueError(f"{name}: must be a non-empty list of {kind.__name__}, got {short_repr(data)}")
    for i, x in enumerate(data):
        if not isinstance(x, kind):
            raise TypeError(f"{name}: item {i} is a {type(x).__name__}, expected {kind.__name__}")


def check_vocab(backbone: nn.Module, encs: Sequence[Encoded]) -> None:
    """Raise when a token id is outside the model's vocabulary (the embedding lookup would fail or wrap)."""
    vocab = vocab_size(unwrap_model(backbone))
    top = max((max(ids) for enc in encs for ids in enc.ids if ids), default=-1)
    if vocab is not None and top >= vocab:
        raise ValueError(f"tokenizer: token id {top} is outside the model's vocabulary of {vocab}")


def resolve_device(backbone: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, or the device of the backbone's first parameter (CPU without parameters)."""
    if device is not None:
        return torch.device(device)
    first = next(iter(backbone.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0 (never attended to)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
