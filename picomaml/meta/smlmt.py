"""Functional core of SMLMT episode sampling: windows, the token->window index, eligibility, assignment.

Everything here is a pure function of its inputs and an explicit ``torch.Generator``;
[`picomaml.meta.sampler.SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler] is a thin stateful wrapper
(arguments, cache, RNG state, streaming). All work runs on CPU tensors: it is index manipulation over a few
hundred thousand integers, done by NumPy's single-threaded kernels when NumPy is importable (see `_incidence`
for why), with a torch-only path that gives identical results.

Vocabulary of this module: a buffer ``(B, L)`` is cut into ``n_windows = B * (L // W)`` windows; window
``w`` is row ``w // windows_per_row``, tokens ``[s, s + W)`` with ``s = (w % windows_per_row) * W``.
The *window count* of a token type is the number of windows that contain it at least once.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

from picomaml.meta.episode import Episode

__all__ = [
    "SamplingError",
    "TokensTypeError",
    "WindowIndex",
    "check_tokens",
    "build_index",
    "frequency_bounds",
    "eligible_tokens",
    "heldout_token_mask",
    "draw_classes",
    "assign_windows",
    "assemble_episode",
    "describe_shortfall",
]


class SamplingError(ValueError):
    """An episode cannot be built from this buffer with these settings; the message says what to change."""


class TokensTypeError(TypeError, ValueError):
    """The token buffer is not a ``torch.long`` tensor (a ``TypeError`` that ``except ValueError`` also catches)."""


@dataclasses.dataclass(frozen=True)
class WindowIndex:
    """Token -> windows incidence of one buffer, in CSR form over the token ids present in it.

    Every structure is sized by the distinct ids of the buffer, never by the largest id, so a buffer
    with an id of ``3e9`` costs what any other buffer of its size does.

    Attributes:
        windows: ``(n_windows, W)`` long, the windows (row-major over the buffer).
        windows_per_row: ``L // W``.
        token_ids: ``(U,)`` long, the distinct token ids of the windows, ascending.
        pair_windows: ``(P,)`` long, for every distinct (token, window) pair the window, sorted by token
            then window; the windows of ``token_ids[i]`` are ``pair_windows[offsets[i]:offsets[i + 1]]``.
        offsets: ``(U + 1,)`` long CSR offsets into ``pair_windows``.
        counts: ``(U,)`` long, the window count of each of ``token_ids``.
        usable_windows: Windows that may be drawn: those without padding (all of them without a pad id).
            Frequency bands that are fractions are fractions of this number.

    Windows that hold the pad id are left out of the incidence: their tokens are no class's examples and
    the pad id itself is never a class.
    """

    windows: Tensor
    windows_per_row: int
    token_ids: Tensor
    pair_windows: Tensor
    offsets: Tensor
    counts: Tensor
    usable_windows: int = -1

    def __post_init__(self) -> None:
        if self.usable_windows < 0:  # frozen: set once, here
            object.__setattr__(self, "usable_windows", int(self.windows.shape[0]))

    @property
    def n_windows(self) -> int:
        """Number of windows in the buffer."""
        return int(self.windows.shape[0])

    @property
    def window_len(self) -> int:
        """Tokens per window ``W``."""
        return int(self.windows.shape[1])

    @property
    def vocab_size(self) -> int:
        """``max token id + 1`` over the windows."""
        return int(self.token_ids[-1]) + 1 if self.token_ids.numel() else 0

    def positions(self, tokens: Tensor) -> Tensor:
        """Where each of ``tokens`` ``(E,)`` sits in `token_ids` (``-1`` for an id not in the buffer)."""
        return _positions(self.token_ids, tokens)

    def count_of(self, token: int) -> int:
        """Number of windows that contain ``token`` (0 for an id not in the buffer)."""
        return int(self.windows_of(token).numel())

    def windows_of(self, token: int) -> Tensor:
        """``(count,)`` sorted indices of the windows that contain ``token`` (empty for an absent id)."""
        at = int(self.positions(torch.tensor([token], dtype=torch.long))[0]) if 0 <= token < 2**63 else -1
        if at < 0:
            return self.pair_windows[:0]
        return self.pair_windows[int(self.offsets[at]) : int(self.offsets[at + 1])]


def check_tokens(tokens: object, name: str = "tokens") -> Tensor:
    """Return ``tokens`` if it is a non-empty 2-D ``torch.long`` tensor of non-negative ids, else raise.

    Raises:
        TokensTypeError: not a tensor, or not ``torch.long``.
        ValueError: not 2-D, empty, or a negative id.
    """
    if not isinstance(tokens, Tensor):
        raise TokensTypeError(f"{name}: expected a 2-D torch.LongTensor (B, L), got {type(tokens).__name__}")
    if tokens.dtype != torch.long:
        raise TokensTypeError(
            f"{name}: expected dtype torch.long (token ids), got {tokens.dtype}; convert with .long()"
        )
    if tokens.dim() != 2:
        hint = " (a single row: use tokens.unsqueeze(0))" if tokens.dim() == 1 else ""
        raise ValueError(f"{name}: expected a 2-D tensor (B, L), got shape {tuple(tokens.shape)}{hint}")
    if tokens.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(tokens.shape)}")
    smallest = _extreme(tokens, largest=False)
    if smallest < 0:
        raise ValueError(f"{name}: token ids must be >= 0, found {smallest}")
    return tokens


def _extreme(tokens: Tensor, largest: bool) -> int:
    """The max (``largest``) or min of a non-empty tensor: by NumPy's single-threaded reduction for a CPU
    tensor when NumPy is importable (torch's parallel one stalls for milliseconds on a busy 2-core machine,
    see `_incidence`)."""
    if tokens.device.type == "cpu" and _numpy_available():
        arr = tokens.detach().numpy()
        return int(arr.max() if largest else arr.min())
    return int(tokens.max() if largest else tokens.min())


def build_index(tokens: Tensor, window_len: int, pad_token_id: int | None = None) -> WindowIndex:
    """Cut ``tokens`` into non-overlapping windows and index which windows hold each token type.

    Args:
        tokens: ``(B, L)`` long. Each row gives ``L // window_len`` windows; the tail is dropped.
        window_len: ``W``.
        pad_token_id: Windows that contain this id are never indexed (padding is neither a class nor a
            position of any episode window).

    Returns:
        The [`WindowIndex`][picomaml.meta.smlmt.WindowIndex] (on CPU).

    Raises:
        TokensTypeError / ValueError: ``tokens`` is not a 2-D long tensor of ids, or rows are shorter than ``W``.
    """
    tokens = check_tokens(tokens).detach().cpu()
    n_rows, length = tokens.shape
    per_row = length // window_len
    if per_row == 0:
        raise ValueError(
            f"tokens: rows have {length} tokens, fewer than window_len={window_len}; "
            f"use longer rows or a smaller window_len"
        )
    windows = _cut_windows(tokens, per_row, window_len)
    n = windows.shape[0]
    largest = _extreme(windows, largest=True)
    top = (2**63 - n) // n  # the keys id * n + window must fit in int64
    if largest > top:
        raise ValueError(
            f"tokens: token id {largest} is too large: a buffer of {n} windows takes ids up to {top} "
            f"(the index packs id * n_windows + window into int64)"
        )
    usable = None
    if pad_token_id is not None:
        clean = (windows != pad_token_id).all(1)
        if not bool(clean.all()):
            usable = clean.nonzero().flatten()  # ascending: mapping back keeps the (token, window) order
    if usable is None:
        pair_windows, token_ids, counts = _incidence(windows, largest=largest)
    elif usable.numel() == 0:
        raise ValueError(f"tokens: every window of {window_len} tokens holds the pad id {pad_token_id}")
    else:
        pair_windows, token_ids, counts = _incidence(windows.index_select(0, usable), largest=largest)
        pair_windows = usable.index_select(0, pair_windows)
    if _numpy_available():  # see _incidence: no torch op over the O(B * L) arrays
        import numpy as np

        offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(counts.numpy()))))
    else:
        offsets = torch.empty(counts.numel() + 1, dtype=torch.long)  # empty + cumsum: no parallel fill
        offsets[0] = 0
        torch.cumsum(counts, 0, out=offsets[1:])
    n_usable = n if usable is None else int(usable.numel())
    return WindowIndex(windows, per_row, token_ids, pair_windows, offsets, counts, n_usable)


def _cut_windows(tokens: Tensor, per_row: int, window_len: int) -> Tensor:
    """``(B * per_row, W)`` windows of ``tokens`` ``(B, L)``: a view when the rows hold no tail, else a copy
    (made by NumPy when importable: torch's parallel copy stalls on a busy machine, see `_incidence`)."""
    n_rows = tokens.shape[0]
    cut = tokens[:, : per_row * window_len]
    if _numpy_available() and not cut.is_contiguous():
        import numpy as np

        cut = torch.from_numpy(np.ascontiguousarray(cut.numpy()))
    return cut.reshape(n_rows * per_row, window_len)


def _numpy_available() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def _incidence(
    windows: Tensor, use_numpy: bool | None = None, largest: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct (token, window) pairs of ``windows`` ``(n, W)``: their windows sorted by (token,
    window) ``(P,)``, the distinct token ids ``(U,)`` ascending, and the window count of each ``(U,)``.

    One sort of keys ordered by (token, window) (the caller bounds the ids so that ``token * n + window``
    fits in int64); the ids and counts are the runs of equal tokens in the sorted keys, so nothing is sized
    by the largest id.

    NumPy is used when importable (a core dependency): its single-threaded kernels take ~0.6 ms for
    64 x 2048 tokens, while torch's parallel ones (any op over more than ~32k elements: the sort,
    ``min``/``max``, even a dtype cast) stall for milliseconds, sometimes ~100 ms, when the intra-op pool
    wakes on an oversubscribed 2-core machine. On that path the key is ``token << b | window`` with ``b`` the bits of the largest
    window index, in int32 when the largest id (``largest``, computed here when None) fits in
    ``31 - b`` bits, which halves the sort; else in int64 (``token * n + window`` when the shift would
    overflow). Every path gives identical results, all int64.
    """
    n, w = windows.shape
    if use_numpy is None:
        use_numpy = _numpy_available()
    if not use_numpy:
        keys = torch.unique(windows.reshape(-1) * n + torch.arange(n * w) // w)
        tok = keys // n
        token_ids, counts = torch.unique_consecutive(tok, return_counts=True)
        return keys - tok * n, token_ids, counts
    import numpy as np

    arr = windows.numpy()
    if largest is None:
        largest = int(arr.max())
    bits = max(1, (n - 1).bit_length())  # window indices < 2 ** bits
    if largest < 2 ** (31 - bits):
        keys = np.left_shift(arr, bits, dtype=np.int32, casting="unsafe")  # exact: ids < 2 ** (31 - bits)
        keys |= np.arange(n, dtype=np.int32)[:, None]
        shift = True
    elif largest < 2 ** (63 - bits):
        keys = (arr << bits) | np.arange(n, dtype=np.int64)[:, None]
        shift = True
    else:
        keys = arr * n + np.arange(n, dtype=np.int64)[:, None]
        shift = False
    keys = keys.reshape(-1)
    keys.sort()
    keep = np.empty(keys.shape, dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    keys = np.compress(keep, keys)  # twice as fast as keys[keep]
    if shift:
        tok = keys >> bits
        pair_windows = (keys & ((1 << bits) - 1)).astype(np.int64, copy=False)
    else:
        tok = keys // n
        pair_windows = keys - tok * n
    first = np.empty(tok.shape, dtype=bool)  # the first pair of each token
    first[0] = True
    np.not_equal(tok[1:], tok[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    counts = np.empty(starts.shape, dtype=np.int64)
    np.subtract(starts[1:], starts[:-1], out=counts[:-1])
    counts[-1] = tok.size - starts[-1]
    return (
        torch.from_numpy(pair_windows),
        torch.from_numpy(tok[starts].astype(np.int64, copy=False)),
        torch.from_numpy(counts),
    )


def _positions(sorted_ids: Tensor, tokens: Tensor) -> Tensor:
    """Index of each of ``tokens`` in the ascending ``sorted_ids``, ``-1`` where absent (NumPy when importable:
    a few microseconds instead of torch's per-op overhead, as in `_incidence`)."""
    if _numpy_available():
        import numpy as np

        ids, want = sorted_ids.numpy(), tokens.numpy()
        pos = np.searchsorted(ids, want)
        hit = ids[np.minimum(pos, ids.size - 1)] == want
        return torch.from_numpy(np.where(hit & (pos < ids.size), pos, -1))
    pos = torch.searchsorted(sorted_ids, tokens)
    hit = sorted_ids.index_select(0, pos.clamp(max=sorted_ids.numel() - 1)) == tokens
    return torch.where(hit & (pos < sorted_ids.numel()), pos, -1)


def frequency_bounds(n_windows: int, min_freq: float, max_freq: float) -> tuple[float, float]:
    """The window-count band ``[lo, hi]``: a bound in ``(0, 1)`` is a fraction of ``n_windows``, else a count."""
    lo = min_freq * n_windows if 0 < min_freq < 1 else float(min_freq)
    hi = max_freq * n_windows if 0 < max_freq < 1 else float(max_freq)
    return lo, hi


def eligible_tokens(
    index: WindowIndex,
    need: int,
    min_freq: float,
    max_freq: float,
    exclude_token_ids: Sequence[int] = (),
) -> Tensor:
    """``(E,)`` ascending ids whose window count lies in the band and is at least ``need``, minus exclusions."""
    lo, hi = frequency_bounds(index.usable_windows, min_freq, max_freq)
    excl = sorted({t for t in exclude_token_ids if 0 <= t < 2**63})  # others cannot be in a LongTensor
    if _numpy_available():  # single-threaded: see _incidence
        c, ids = index.counts.numpy(), index.token_ids.numpy()
        ok = (c >= max(lo, need)) & (c <= hi)
        at = index.positions(torch.tensor(excl, dtype=torch.long)).numpy()
        ok[at[at >= 0]] = False
        return torch.from_numpy(ids[ok])
    ok = (index.counts >= max(lo, need)) & (index.counts <= hi)
    at = index.positions(torch.tensor(excl, dtype=torch.long))
    ok[at[at >= 0]] = False
    return index.token_ids[ok]


_MASK32 = 0xFFFFFFFF


def heldout_token_mask(token_ids: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """``(E,)`` bool: which of ``token_ids`` ``(E,)`` belong to the held-out class split.

    A token type is held out when a 32-bit integer hash of ``(id, seed)``, read as a number in ``[0, 1)``,
    is below ``fraction``. The split is a pure function of the id, so it needs no vocabulary size, is the
    same on every rank and in every process, and the training sampler (``class_split="train"``) and the
    evaluation sampler (``class_split="heldout"``) partition every vocabulary exactly, whatever buffer they
    index. About ``fraction`` of any large set of ids is held out.

    Args:
        token_ids: ``(E,)`` integer token ids (>= 0).
        fraction: Share of token types held out, in ``[0, 1)``.
        seed: Chooses among splits of the same size.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction: must be in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return torch.zeros(token_ids.shape, dtype=torch.bool)
    # A multiplicative hash and two xor-shift-multiply rounds (int64 arithmetic, every product < 2**63):
    # neighbouring ids, which BPE gives to related pieces, land far apart.
    x = (token_ids.long() * 2654435761 + (seed & _MASK32) * 40503 + 0x9E3779B9) & _MASK32
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x045D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return x.double() / 2.0**32 < fraction


def draw_classes(
    index: WindowIndex,
    eligible: Tensor,
    n_way: int,
    class_sampling: str,
    power: float,
    generator: torch.Generator,
) -> Tensor:
    """``(N,)`` distinct token ids drawn without replacement, uniformly or with weight ``count ** power``."""
    if class_sampling == "uniform":
        weights = torch.ones(eligible.numel())
    else:
        weights = index.counts.index_select(0, index.positions(eligible)).double().pow(power)
    return eligible.index_select(0, torch.multinomial(weights, n_way, replacement=False, generator=generator))


def assign_windows(
    index: WindowIndex, classes: Tensor, per_class: int, generator: torch.Generator
) -> Tensor | None:
    """Give every class ``per_class`` distinct windows that contain it, no window to two classes.

    Fast path (tensor ops): each class takes its ``per_class`` best windows by a random priority, preferring
    windows that hold no other chosen class. If two classes still claim one window, an exact augmenting-path
    repair (bipartite b-matching) resolves it, so a valid assignment is found whenever one exists.

    Args:
        index: The buffer's index.
        classes: ``(N,)`` token ids, each present in at least ``per_class`` windows.
        per_class: ``K + Q``.
        generator: Source of randomness.

    Returns:
        ``(N, per_class)`` window indices in random order, or None when no valid assignment exists.
    """
    if _numpy_available():  # the same draws and the same result, in a third of the time (see _incidence)
        return _assign_windows_numpy(index, classes, per_class, generator)
    n = classes.numel()
    at = index.positions(classes)
    starts, lens = index.offsets.index_select(0, at), index.counts.index_select(0, at)
    first = torch.cumsum(lens, 0) - lens
    pair_class = _segment_ids(first, int(lens.sum()))
    pos = torch.arange(pair_class.numel()) + (starts - first).index_select(0, pair_class)
    pair_win = index.pair_windows.index_select(0, pos)
    contested = torch.bincount(pair_win, minlength=index.n_windows).index_select(0, pair_win) > 1
    prio = torch.rand(pair_win.numel(), generator=generator, dtype=torch.float64)
    # sort by (class, contested, priority): uncontested windows first, random within
    order = torch.argsort(pair_class * 4.0 + contested * 2.0 + prio)
    rank = torch.arange(order.numel()) - first.index_select(0, pair_class.index_select(0, order))
    take = order.masked_select(rank < per_class)  # (N * per_class,), grouped by class
    chosen = pair_win.index_select(0, take).view(n, per_class)
    if torch.unique(chosen).numel() == chosen.numel():
        # random order within the class, so support/query do not split by the contested flag
        shuffle = torch.argsort(prio.index_select(0, take).view(n, per_class), dim=1)
        return torch.gather(chosen, 1, shuffle)
    # slow path: exact repair in Python over this episode's candidates only
    cand_order = torch.argsort(pair_class * 2.0 + prio)
    cand = torch.split(pair_win.index_select(0, cand_order), lens.tolist())
    result = _repair([c.tolist() for c in cand], chosen.tolist(), per_class)
    if result is None:
        return None
    out = torch.tensor(result, dtype=torch.long)
    return torch.gather(out, 1, torch.argsort(torch.rand(out.shape, generator=generator), dim=1))


def _assign_windows_numpy(
    index: WindowIndex, classes: Tensor, per_class: int, generator: torch.Generator
) -> Tensor | None:
    """[`assign_windows`][picomaml.meta.smlmt.assign_windows] with NumPy arithmetic: the same random draws
    from ``generator`` (torch's, in the same order and shapes) and the same sort keys, so the same result.
    Each NumPy call on these ~10^3 elements costs ~1-2 us against ~5-10 us for a torch op, and there are ~30
    of them per draw."""
    import numpy as np

    n = classes.numel()
    at = index.positions(classes).numpy()
    if (at < 0).any():  # as index_select on the torch path
        raise IndexError(
            f"assign_windows: classes {classes[torch.from_numpy(at < 0)].tolist()} are not in the index"
        )
    starts, lens = index.offsets.numpy()[at], index.counts.numpy()[at]
    first = np.cumsum(lens) - lens
    pair_class = np.repeat(np.arange(n, dtype=np.int64), lens)
    pair_win = index.pair_windows.numpy()[np.arange(pair_class.size) + np.repeat(starts - first, lens)]
    contested = np.bincount(pair_win, minlength=index.n_windows)[pair_win] > 1
    prio = torch.rand(pair_win.size, generator=generator, dtype=torch.float64).numpy()
    # the keys of the torch path, bit for bit: small integers (exact in any float type) plus prio in float64
    order = np.argsort(pair_class * 4.0 + contested * 2.0 + prio, kind="stable")
    rank = np.arange(order.size) - first[pair_class[order]]
    take = order[rank < per_class]  # (N * per_class,), grouped by class
    chosen = pair_win[take].reshape(n, per_class)
    flat = np.sort(chosen, axis=None)
    if not (flat[1:] == flat[:-1]).any():
        shuffle = np.argsort(prio[take].reshape(n, per_class), axis=1, kind="stable")
        return torch.from_numpy(np.take_along_axis(chosen, shuffle, axis=1))
    cand_sorted = pair_win[np.argsort(pair_class * 2.0 + prio, kind="stable")].tolist()
    bounds = np.concatenate((first, [pair_class.size])).tolist()
    cand = [cand_sorted[bounds[c] : bounds[c + 1]] for c in range(n)]
    result = _repair(cand, chosen.tolist(), per_class)
    if result is None:
        return None
    out = torch.tensor(result, dtype=torch.long)  # float32 draws: ties are possible, so torch's own argsort
    return torch.gather(out, 1, torch.argsort(torch.rand(out.shape, generator=generator), dim=1))


def _segment_ids(first: Tensor, total: int) -> Tensor:
    """``repeat_interleave(arange(n), lens)`` given the segment starts, as a cumsum of boundary marks.

    (``torch.repeat_interleave`` wakes the intra-op thread pool even for tiny inputs, which costs
    milliseconds on a busy machine.)
    """
    marks = torch.zeros(total + 1, dtype=torch.long)
    marks.index_add_(0, first[1:], torch.ones(first.numel() - 1, dtype=torch.long))
    return torch.cumsum(marks[:total], 0)


def _repair(cand: list[list[int]], chosen: list[list[int]], need: int) -> list[list[int]] | None:
    """Turn a conflicting first choice into a valid assignment by augmenting paths, or return None.

    ``cand[c]`` lists class ``c``'s windows in random order; ``chosen[c]`` is its first choice. Windows
    claimed twice go to the first claimant; each class short of ``need`` then gains windows through
    shortest augmenting paths (a class may hand a window to another and take a free one instead).
    """
    owner: dict[int, int] = {}
    held: list[set[int]] = [set() for _ in cand]
    for c, wins in enumerate(chosen):
        for w in wins:
            if w not in owner:
                owner[w] = c
                held[c].add(w)
    for c in range(len(cand)):
        while len(held[c]) < need:
            if not _augment(c, cand, owner, held):
                return None
    return [list(h) for h in held]


def _augment(start: int, cand: list[list[int]], owner: dict[int, int], held: list[set[int]]) -> bool:
    parent: dict[int, tuple[int, int]] = {}  # class -> (class that takes window from it, window)
    queue, seen = deque([start]), {start}
    while queue:
        x = queue.popleft()
        for w in cand[x]:
            o = owner.get(w)
            if o is None:  # free window: x takes it, then every class on the path passes one back
                owner[w] = x
                held[x].add(w)
                while x != start:
                    px, pw = parent[x]
                    held[x].discard(pw)
                    owner[pw] = px
                    held[px].add(pw)
                    x = px
                return True
            if o not in seen:
                seen.add(o)
                parent[o] = (x, w)
                queue.append(o)
    return False


def assemble_episode(
    index: WindowIndex,
    classes: Tensor,
    windows: Tensor,
    labels: Tensor,
    k_shot: int,
    mask_token_id: int,
) -> Episode:
    """Mask and lay out one episode, label-major.

    Args:
        index: The buffer's index.
        classes: ``(N,)`` token ids in draw order.
        windows: ``(N, K + Q)`` window indices of each class (first ``K`` become support).
        labels: ``(N,)`` a permutation of ``0..N-1``: the task-local label of each drawn class.
        k_shot: ``K``.
        mask_token_id: Replaces every occurrence of the class token in its window (other tokens, including
            other classes' tokens, are left untouched).
    """
    order = torch.argsort(labels)  # row l of the result is label l
    class_ids, wins = classes.index_select(0, order), windows.index_select(0, order)
    n, m = wins.shape
    if _numpy_available():  # the same tensors, with a few NumPy calls instead of ~20 torch ops
        import numpy as np

        all_windows, ids_of, w_all = index.windows.numpy(), class_ids.numpy(), wins.numpy()
        out = []
        for sl, per in ((slice(0, k_shot), k_shot), (slice(k_shot, m), m - k_shot)):
            w = np.ascontiguousarray(w_all[:, sl]).reshape(-1)
            ids = all_windows[w]
            row_label = np.repeat(np.arange(n, dtype=np.int64), per)
            mask = ids == ids_of[row_label][:, None]
            ids[mask] = mask_token_id
            out += [torch.from_numpy(x) for x in (ids, row_label, mask, w)]
        (s_ids, s_lab, s_mask, s_win, q_ids, q_lab, q_mask, q_win) = out
        return Episode(
            s_ids, s_lab, s_mask, q_ids, q_lab, q_mask, class_ids, s_win, q_win, index.windows_per_row
        )
    parts = {}
    for part, sl, per in (("support", slice(0, k_shot), k_shot), ("query", slice(k_shot, m), m - k_shot)):
        w = wins[:, sl].reshape(-1)
        ids = index.windows.index_select(0, w)
        row_label = torch.arange(n * per) // per
        mask = ids == class_ids.index_select(0, row_label).unsqueeze(1)
        parts[part] = (ids.masked_fill(mask, mask_token_id), row_label, mask, w)
    (s_ids, s_lab, s_mask, s_win), (q_ids, q_lab, q_mask, q_win) = parts["support"], parts["query"]
    return Episode(s_ids, s_lab, s_mask, q_ids, q_lab, q_mask, class_ids, s_win, q_win, index.windows_per_row)


def describe_shortfall(
    index: WindowIndex, n_eligible: int, n_way: int, per_class: int, min_freq: float, max_freq: float
) -> str:
    """The message for too few eligible classes: the numbers and what to change."""
    lo, hi = frequency_bounds(index.usable_windows, min_freq, max_freq)
    return (
        f"only {n_eligible} token types are eligible as classes, but n_way={n_way} are needed. Eligible means: "
        f"present in between {math.ceil(max(lo, per_class))} and {math.floor(hi)} of the buffer's "
        f"{index.n_windows} windows (band min_freq={min_freq}, max_freq={max_freq}; at least "
        f"k_shot + n_query = {per_class} windows), not excluded and not the mask token. "
        f"Use more rows (a bigger buffer), a smaller n_way / k_shot / n_query, or a wider frequency band."
    )
