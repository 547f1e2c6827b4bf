"""SMLMTSampler: N-way K-shot episodes from unlabelled token windows (Subset Masked LM Tasks).

A thin stateful class over the functional core in [`picomaml.meta.smlmt`][picomaml.meta.smlmt]: it validates
its arguments, owns a seeded ``torch.Generator`` (with ``state_dict``), caches the token->window index of the
last buffer and streams episodes from an iterable of rows. See ``docs/pages/episodes.md`` for the method and
guarantees.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from picomaml.meta import smlmt
from picomaml.meta.episode import Episode
from picomaml.meta.smlmt import SamplingError, TokensTypeError, WindowIndex
from picomaml.params import ConfigError, Params, check, check_int, hparam, short_repr, to_dict

__all__ = ["SMLMTSampler", "SamplerConfig", "ClassSampling", "ClassSplit", "SamplingError", "TokensTypeError", "WindowIndex"]

ClassSampling = Literal["uniform", "count_power"]
ClassSplit = Literal["train", "heldout"]
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class SamplerConfig(Params):
    """Hyperparameters of [`SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler] (YAML section ``sampler``);
    ``mask_token_id`` comes from the tokenizer and ``seed`` from the experiment. See
    [`SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler] for the meaning of each."""

    n_way: int = hparam(8, ge=2, doc="classes per task N")
    k_shot: int = hparam(4, ge=1, doc="support windows per class K")
    n_query: int = hparam(4, ge=1, doc="query windows per class Q")
    # one token would be all mask: the backbone would see nothing of the context
    window_len: int = hparam(32, ge=2, doc="tokens per window W (rows are cut into L // W windows)")
    min_freq: float = hparam(4.0, ge=0, doc="lower bound of the window-count band: fraction in (0, 1) or count")
    max_freq: float = hparam(0.5, gt=0, doc="upper bound of the window-count band: fraction in (0, 1) or count")
    exclude_token_ids: tuple[int, ...] = hparam((), ge=0, doc="ids never used as classes (besides the specials)")
    class_sampling: ClassSampling = hparam("uniform", doc="classes uniformly, or with p ~ window_count ** power")
    power: float = hparam(0.3, gt=0, doc="exponent of count_power class sampling")
    holdout_fraction: float = hparam(0.0, ge=0, lt=1, doc="share of token types kept out of training classes")
    holdout_seed: int = hparam(0, doc="chooses which token types are held out")
    class_split: ClassSplit = hparam("train", doc="train: classes from the types not held out; heldout: only those")

    def validate(self) -> None:
        check(
            self.class_split == "train" or self.holdout_fraction > 0,
            "class_split",
            "'heldout' draws classes only from the held-out token types, so it needs holdout_fraction > 0",
        )


class SMLMTSampler:
    """Builds SMLMT episodes: N token types become N classes, their windows (masked) the examples.

    For each task: choose ``n_way`` distinct eligible token types (uniformly, or with probability
    proportional to ``window_count ** power``), give them task-local labels by a fresh random permutation,
    take ``k_shot + n_query`` distinct windows containing each (no window serves two classes or both support
    and query), and replace every occurrence of the class token in its window with ``mask_token_id``.

    A token is *eligible* when the number of buffer windows that contain it lies in
    ``[min_freq, max_freq]``, is at least ``k_shot + n_query``, and it is neither ``mask_token_id`` nor in
    ``exclude_token_ids``. Each bound is a fraction of the number of windows when it lies strictly between
    0 and 1, and a count of windows otherwise: ``max_freq=0.5`` means "in at most half the windows",
    ``max_freq=200`` "in at most 200 windows" (so ``max_freq=1`` means one window; use e.g. ``0.999`` for
    "almost all"), ``min_freq=4`` "in at least 4 windows", ``min_freq=0`` no lower bound.

    Args:
        n_way: Classes per task ``N`` (>= 2).
        k_shot: Support windows per class ``K`` (>= 1).
        n_query: Query windows per class ``Q`` (>= 1).
        mask_token_id: Token id that replaces the class token (>= 0); never a class itself.
        window_len: Tokens per window ``W``; rows are cut into ``L // W`` non-overlapping windows.
        min_freq: Lower bound of the window-count band (fraction in (0, 1) or count).
        max_freq: Upper bound of the window-count band (fraction in (0, 1) or count).
        exclude_token_ids: Ids never used as classes (padding, BOS/EOS, ...).
        class_sampling: ``"uniform"`` or ``"count_power"``.
        power: Exponent of ``"count_power"`` sampling.
        holdout_fraction: Share of token types (chosen by a hash of the id, see
            [`picomaml.meta.smlmt.heldout_token_mask`][picomaml.meta.smlmt.heldout_token_mask]) set aside as
            evaluation classes, in ``[0, 1)``.
        holdout_seed: Chooses which types are held out.
        class_split: ``"train"``: classes come from the types *not* held out (all types when
            ``holdout_fraction`` is 0); ``"heldout"``: only from the held-out types. Training and evaluation
            samplers with the same fraction and seed thus never share a class.
        seed: Seed of the sampler's own ``torch.Generator``.
        pad_token_id: The id that pads short rows (the tokenizer's pad token), or ``None``. Padding is
            never a class and never inside an episode window: windows that hold it are not drawn, so every
            position of every window is a real token (``"last"``/``"mean"`` pooling count only real ones).
    """

    #: How many times to redraw the classes when their windows cannot be assigned without reuse.
    max_redraws: int = 8

    def __init__(
        self,
        n_way: int,
        k_shot: int,
        n_query: int,
        mask_token_id: int,
        window_len: int,
        min_freq: float = SamplerConfig.min_freq,
        max_freq: float = SamplerConfig.max_freq,
        exclude_token_ids: Sequence[int] = SamplerConfig.exclude_token_ids,
        class_sampling: ClassSampling = SamplerConfig.class_sampling,
        power: float = SamplerConfig.power,
        holdout_fraction: float = SamplerConfig.holdout_fraction,
        holdout_seed: int = SamplerConfig.holdout_seed,
        class_split: ClassSplit = SamplerConfig.class_split,
        seed: int = 0,
        pad_token_id: int | None = None,
    ) -> None:
        mask_token_id = check_int("mask_token_id", mask_token_id, ge=0)
        if pad_token_id is not None:
            pad_token_id = check_int("pad_token_id", pad_token_id, ge=0)
            if pad_token_id == mask_token_id:
                raise ConfigError(f"pad_token_id: must differ from mask_token_id ({mask_token_id})")
        seed = check_int("seed", seed)
        if isinstance(exclude_token_ids, (str, bytes)) or not isinstance(exclude_token_ids, Iterable):
            raise ConfigError(f"exclude_token_ids: must be a sequence of integers >= 0, got {exclude_token_ids!r}")
        self.config = SamplerConfig(
            n_way=n_way, k_shot=k_shot, n_query=n_query, window_len=window_len, min_freq=min_freq,
            max_freq=max_freq, exclude_token_ids=tuple(exclude_token_ids), class_sampling=class_sampling,
            power=power, holdout_fraction=holdout_fraction, holdout_seed=holdout_seed, class_split=class_split,
        )  # fmt: skip
        c = self.config
        n_way, k_shot, n_query, window_len = c.n_way, c.k_shot, c.n_query, c.window_len
        min_freq, max_freq, power, exclude = c.min_freq, c.max_freq, c.power, c.exclude_token_ids
        holdout_fraction = c.holdout_fraction
        self.n_way, self.k_shot, self.n_query, self.window_len = n_way, k_shot, n_query, window_len
        self.mask_token_id = mask_token_id
        self.min_freq, self.max_freq, self.power = float(min_freq), float(max_freq), float(power)
        self.class_sampling = class_sampling
        self.exclude_token_ids = exclude
        self.holdout_fraction, self.holdout_seed = float(holdout_fraction), holdout_seed
        self.class_split = class_split
        self.pad_token_id = pad_token_id
        # the mask and the padding are never classes
        self._excluded = tuple(sorted(set(exclude) | {mask_token_id} | ({pad_token_id} - {None})))
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.episodes_sampled = 0
        self._cache: tuple[Any, int, WindowIndex, Tensor] | None = None

    @classmethod
    def from_config(
        cls, config: SamplerConfig | Mapping[str, Any], mask_token_id: int, seed: int = 0,
        pad_token_id: int | None = None,
    ) -> SMLMTSampler:  # fmt: skip
        """Build from a [`SamplerConfig`][picomaml.meta.sampler.SamplerConfig] (or its dict) plus the
        tokenizer's mask (and pad) id."""
        values = to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
        return cls(**values, mask_token_id=mask_token_id, seed=seed, pad_token_id=pad_token_id)

    # ------------------------------------------------------------------ index

    @property
    def per_class(self) -> int:
        """Windows each class needs: ``k_shot + n_query``."""
        return self.k_shot + self.n_query

    def index(self, tokens: Tensor) -> WindowIndex:
        """The [`WindowIndex`][picomaml.meta.smlmt.WindowIndex] of ``tokens`` ``(B, L)``, built once and
        cached for the same tensor.

        The cache is keyed by the tensor's identity and its version counter, so in-place edits of the
        buffer (``tokens[...] = ...``) trigger a rebuild; a new tensor always does.
        """
        return self._prepare(tokens)[0]

    def eligible(self, tokens: Tensor | WindowIndex) -> Tensor:
        """``(E,)`` ids of the token types this sampler may use as classes in ``tokens``."""
        return self._prepare(tokens)[1]

    def _prepare(self, tokens: Tensor | WindowIndex) -> tuple[WindowIndex, Tensor]:
        if isinstance(tokens, WindowIndex):
            if tokens.window_len != self.window_len:
                raise ValueError(
                    f"tokens: index has window_len {tokens.window_len}, sampler {self.window_len}"
                )
            return tokens, self._eligible(tokens)
        cache = self._cache
        if cache is not None and cache[0]() is tokens and cache[1] == tokens._version:
            return cache[2], cache[3]
        index = smlmt.build_index(tokens, self.window_len, self.pad_token_id)
        eligible = self._eligible(index)
        self._cache = (weakref.ref(tokens), tokens._version, index, eligible)
        return index, eligible

    def _eligible(self, index: WindowIndex) -> Tensor:
        windows = index.count_of(self.mask_token_id)
        if windows:  # masked windows would be indistinguishable from windows that hold the id itself
            times = int((index.windows == self.mask_token_id).sum())
            raise SamplingError(
                f"mask_token_id: {self.mask_token_id} is a real token of these rows: it occurs {times} times, in "
                f"{windows} of their {index.n_windows} windows, so a masked class token could not be told from "
                f"it. Use an id the data never contains (the tokenizer's mask token)."
            )
        eligible = smlmt.eligible_tokens(index, self.per_class, self.min_freq, self.max_freq, self._excluded)
        if self.holdout_fraction == 0.0:
            return eligible
        held = smlmt.heldout_token_mask(eligible, self.holdout_fraction, self.holdout_seed)
        return eligible[held if self.class_split == "heldout" else ~held]

    def heldout_token_ids(self, vocab_size: int) -> Tensor:
        """``(H,)`` ascending ids below ``vocab_size`` in the held-out class split (empty without one).

        The training sampler (``class_split="train"``) never uses them as classes; an evaluation sampler
        with the same ``holdout_fraction`` and ``holdout_seed`` and ``class_split="heldout"`` uses only them.
        """
        ids = torch.arange(vocab_size)
        return ids[smlmt.heldout_token_mask(ids, self.holdout_fraction, self.holdout_seed)]

    # ------------------------------------------------------------------ sampling

    def sample(self, tokens: Tensor | WindowIndex, n_tasks: int | None = None) -> Episode:
        """Sample one episode, or ``n_tasks`` independent ones stacked along a leading dimension.

        Args:
            tokens: ``(B, L)`` long buffer of token rows (or its
                [`index`][picomaml.meta.sampler.SMLMTSampler.index]).
            n_tasks: None for a single [`Episode`][picomaml.meta.episode.Episode] of shape ``(N*K, W)``...; an
                int ``T >= 1`` for a stacked one of shape ``(T, N*K, W)``...

        Returns:
            The episode, on the device of ``tokens`` (sampling itself runs on CPU).

        Raises:
            TokensTypeError / ValueError: bad ``tokens`` (not 2-D long, negative ids, rows shorter than W).
            SamplingError: fewer eligible token types than ``n_way``, or no way to give every class
                ``k_shot + n_query`` windows without reuse after `max_redraws` draws.
        """
        if n_tasks is not None:
            n_tasks = check_int("n_tasks", n_tasks, ge=1)
        index, eligible = self._prepare(tokens)
        if n_tasks is None:
            episode = self._sample_one(index, eligible)
        else:
            episode = Episode.stack([self._sample_one(index, eligible) for _ in range(n_tasks)])
        if isinstance(tokens, Tensor) and tokens.device.type != "cpu":
            episode = episode.to(tokens.device)
        return episode

    def _sample_one(self, index: WindowIndex, eligible: Tensor) -> Episode:
        if eligible.numel() < self.n_way:
            why = smlmt.describe_shortfall(
                index, eligible.numel(), self.n_way, self.per_class, self.min_freq, self.max_freq
            )
            if self.holdout_fraction > 0:
                why += (
                    f" Only the {self.class_split!r} class split counts (holdout_fraction="
                    f"{self.holdout_fraction}, holdout_seed={self.holdout_seed})."
                )
            raise SamplingError(why)
        for _ in range(self.max_redraws):
            classes = smlmt.draw_classes(
                index, eligible, self.n_way, self.class_sampling, self.power, self.generator
            )
            windows = smlmt.assign_windows(index, classes, self.per_class, self.generator)
            if windows is not None:
                break
            _log.debug(
                "classes %s cannot all be placed without reusing a window; redrawing", classes.tolist()
            )
        else:
            raise SamplingError(
                f"could not give {self.n_way} classes {self.per_class} windows each without reusing a window "
                f"after {self.max_redraws} draws of the classes ({eligible.numel()} eligible types, "
                f"{index.n_windows} windows): the eligible types share too many windows. Use more rows, "
                f"a smaller n_way / k_shot / n_query, or a larger min_freq."
            )
        labels = torch.randperm(self.n_way, generator=self.generator)
        self.episodes_sampled += 1
        return smlmt.assemble_episode(index, classes, windows, labels, self.k_shot, self.mask_token_id)

    def episodes(
        self,
        rows: Iterable[Tensor | Sequence[int]],
        buffer_rows: int = 64,
        refresh: int = 1,
        n_tasks: int | None = None,
    ) -> Iterator[Episode]:
        """Stream episodes from an iterable of token rows.

        Keeps the newest ``buffer_rows`` rows: fills the buffer first, then repeatedly yields ``refresh``
        episodes from the current buffer and pulls the next item (a 1-D row ``(L,)`` or a batch ``(B, L)``)
        into it, dropping the oldest rows; the index is rebuilt whenever the buffer changes. Stops when the
        iterable is exhausted (after yielding from the last buffer). All rows must share one length.
        The position in ``rows`` is not part of [`state_dict`][picomaml.meta.sampler.SMLMTSampler.state_dict].
        """
        buffer_rows = check_int("buffer_rows", buffer_rows, ge=1)
        refresh = check_int("refresh", refresh, ge=1)
        buffer: deque[Tensor] = deque(maxlen=buffer_rows)
        source = iter(rows)
        end = object()

        def pull() -> bool:
            item = next(source, end)
            if item is end:
                return False
            batch = item if isinstance(item, Tensor) else torch.as_tensor(item, dtype=torch.long)
            if batch.dim() == 1:
                batch = batch.unsqueeze(0)
            smlmt.check_tokens(batch, "rows item")
            if buffer and batch.shape[1] != buffer[0].shape[0]:
                raise ValueError(
                    f"rows: got a row of length {batch.shape[1]}, the buffer's rows have {buffer[0].shape[0]}"
                )
            buffer.extend(batch.unbind(0))
            return True

        more = True
        while more and len(buffer) < buffer_rows:
            more = pull()
        while buffer:
            tokens = torch.stack(list(buffer))
            for _ in range(refresh):
                yield self.sample(tokens, n_tasks)
            if not more or not pull():
                return

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": ByteTensor, "seed": int, "episodes_sampled": int}``: enough to continue exactly."""
        return {
            "generator": self.generator.get_state(),
            "seed": self.seed,
            "episodes_sampled": self.episodes_sampled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][picomaml.meta.sampler.SMLMTSampler.state_dict]; the next episodes equal
        those the saved sampler would have drawn."""
        missing = {"generator", "seed", "episodes_sampled"} - set(state)
        if missing:
            raise KeyError(f"SMLMTSampler.load_state_dict: missing keys {sorted(missing)}")
        gen, own = state["generator"], self.generator.get_state()
        if not isinstance(gen, torch.Tensor) or gen.dtype != own.dtype or gen.shape != own.shape:
            raise ValueError(
                f"SMLMTSampler.load_state_dict: 'generator' is {short_repr(gen)}, not a {own.dtype} generator "
                f"state of shape {tuple(own.shape)}"
            )
        seed = check_int("SMLMTSampler.load_state_dict: 'seed'", state["seed"])
        episodes = check_int("SMLMTSampler.load_state_dict: 'episodes_sampled'", state["episodes_sampled"], ge=0)
        self.generator.set_state(gen)
        self.seed, self.episodes_sampled = seed, episodes

    def __repr__(self) -> str:
        return (
            f"SMLMTSampler(n_way={self.n_way}, k_shot={self.k_shot}, n_query={self.n_query}, "
            f"window_len={self.window_len}, mask_token_id={self.mask_token_id}, pad_token_id={self.pad_token_id}, "
            f"min_freq={self.min_freq}, "
            f"max_freq={self.max_freq}, class_sampling={self.class_sampling!r}, "
            f"holdout_fraction={self.holdout_fraction}, class_split={self.class_split!r}, seed={self.seed})"
        )
