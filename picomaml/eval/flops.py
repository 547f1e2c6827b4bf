"""Training FLOPs of an AR step and a meta step, so runs can be compared at equal compute.

The accounting is the standard one for transformers (Kaplan et al. 2020; Hoffmann et al. 2022): only
matrix multiplications count, a multiply-add is 2 FLOPs, and the backward pass costs twice the forward
(each matmul ``Y = X W`` needs ``dX = dY W^T`` and ``dW = X^T dY``, both the size of the forward).
Norms, activations, rotary embeddings, softmax, the loss and the embedding lookup are left out (they are
a few percent at most). Formulas, with ``d = d_model``, ``kv = n_kv_heads * head_dim``, ``f = ffn_dim``,
``V = vocab_size``, ``n_layers`` blocks:

* Matmul weights per block ``P = 2 d^2 + 2 d kv + 3 d f`` (q, o: ``d x d``; k, v: ``d x kv``; SwiGLU gate,
  up, down: ``d x f``), so the body has ``P_body = n_layers * P``; the LM head has ``d V``.
* Attention scores and values over a sequence of ``L`` tokens: ``2 * 2 * L * d`` forward FLOPs per
  token and layer (``Q K^T`` and ``A V``; the full ``L x L`` square is counted, as the math kernel and the
  usual accounting do, although a causal kernel may skip half of it).
* **AR step**, ``B`` rows of ``L`` input tokens (``tokens = B L``):

    ```text
    ar = 6 * tokens * (P_body + d V) + 12 * n_layers * L * d * tokens
    ```

* **Meta step**: the backbone runs forward and backward once over ``M = T * N * (K + Q)`` windows of
  ``W`` tokens, without the LM head (only hidden states are pooled):

    ```text
    backbone = 6 * M * W * P_body + 12 * n_layers * W * d * M * W
    ```

    plus, per task, the inner loop on the head. With ``P_h`` the matmul weights of the head (``D -> h_1 ->
    ... -> N``, the output layer included also for prototype init) and ``P_1 = D h_1`` those of its first
    layer, a forward over the ``N K`` support rows costs ``c = 2 P_h N K``, the first layer's share of it
    ``c_1 = 2 P_1 N K``, and a forward over the ``N Q`` query rows ``q = 2 P_h N Q``:

    ```text
    inner step   s = 3 c - c_1                  (forward c; backward: weight gradients c, input
                                                 gradients c - c_1, none for the first layer's input)
    first order:   steps * s + 3 q              (no graph kept; query forward + backward)
    second order:  steps * 3 s + 3 q            (the outer backward also runs through each inner step)
    ```

    Model of the second-order cost: an inner step is a graph of matmuls costing ``s``; back-propagating
    through it costs twice that graph again (``2 s``), so ``3 s`` per step, three times the first-order
    step. This is exact for the autograd path (the tests compare it with ``FlopCounterMode``); the
    closed-form path of linear heads and the prototype-init class means are not modelled. The head is
    usually well under 1 % of a meta step.

* **Adapted blocks** (``adapt_layers = k``): the lower ``n_layers - k`` blocks run forward once over the
  ``M`` windows, per task and part; their backward runs over the query windows, and over the support
  windows only second order with ``steps >= 1`` (first order, nothing of the loss depends on the support
  rows below the adapted blocks). With ``f_s`` / ``f_q`` the forward matmul FLOPs of the ``k`` adapted
  blocks over a task's ``N K`` support / ``N Q`` query rows (``2 r W k P + 4 k W^2 d r`` for ``r`` rows),
  an inner step is a forward and a backward (``3 f_s``: every input gradient is needed, the blocks' norm
  gains adapt too), three times that second order, and per task:

    ```text
    first order:   f_s + steps * 3 f_s + 3 f_q + (f_q + f_s)
    second order:  steps * 9 f_s + 3 f_q + (f_q + f_s)        (+ f_s when steps = 0)
    ```

    (the initial support forward is the first step's forward second order, an extra one first order; the
    final query forward and backward is ``3 f_q``; ``f_q + f_s`` are the metric forwards of the query rows
    before and of the support rows after adaptation). The head's inner step is then ``3 c`` (its input
    gradient is needed: the features depend on the adapted blocks). Not modelled: the support rows'
    backward that prototype init or ``feature_norm`` add first order, and ``feature_norm``'s backward over
    the support rows after adaptation.

* **Per-task LoRA factors** (``lora_rank``, [`TaskLoRA`][picomaml.meta.task_lora.TaskLoRA]): the whole
  backbone re-runs per inner step under the merged weights. Over a task's support rows, with ``m_s`` the
  forward FLOPs of every block's weight matmuls, ``a_s`` those of its attention products (two activations:
  both get gradients) and ``g_s = 2 N K W n_layers P_t`` the weight gradients of the target matrices
  (``P_t`` their weights per block), an inner step is a forward, the input gradients of every block and the
  target matrices' weight gradients (``2 m_s + 3 a_s + g_s``); second order the outer backward runs through
  the forward (``2 m_s + 2 a_s``) and the inner backward (``2 m_s + 4 a_s + 2 g_s``), and the first step
  reuses the initial support forward. Added per task to a head-only meta step (whose backbone pass and final
  query are already counted):

    ```text
    first order:   steps * (2 m_s + 3 a_s + g_s) + r
    second order:  steps * (6 m_s + 9 a_s + 3 g_s) - (m_s + a_s) + r        (0 when steps = 0)
    ```

    with ``r = (m_q + a_q) - (m_s + a_s)`` (the query rows' metric forward, less a support backward the
    head-only count holds and this path does not run; zero when ``K = Q``).

    The factors' own products (``B A``, rank ``r``) are left out (under 0.1 % at rank 4).

``tests/eval/test_flops.py`` checks these formulas against ``torch.utils.flop_counter.FlopCounterMode``
for a real forward and backward of a tiny [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder] (exact
for the backbone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from picomaml.params import check_int

__all__ = [
    "body_matmul_params",
    "ar_step_flops",
    "backbone_flops",
    "head_matmul_params",
    "inner_loop_flops",
    "adapted_blocks_flops",
    "task_lora_flops",
    "meta_step_flops",
]


def _model_dims(model_config: Any) -> tuple[int, int, int, int, int]:
    """``(d_model, kv_dim, ffn_dim, vocab_size, n_layers)`` of a PicoDecoderConfig (or a mapping of it)."""
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
    try:
        d, n_heads, n_kv = int(get("d_model")), int(get("n_heads")), int(get("n_kv_heads"))
        f, v, n_layers = int(get("ffn_dim")), int(get("vocab_size")), int(get("n_layers"))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "model_config: expected a PicoDecoderConfig (or a dict) with d_model, n_heads, n_kv_heads, "
            f"ffn_dim, vocab_size and n_layers, got {model_config!r}"
        ) from exc
    return d, n_kv * (d // n_heads), f, v, n_layers


def body_matmul_params(model_config: Any) -> int:
    """Matmul weights of all blocks, ``n_layers * (2 d^2 + 2 d kv + 3 d f)`` (no embeddings, no LM head)."""
    d, kv, f, _, n_layers = _model_dims(model_config)
    return n_layers * (2 * d * d + 2 * d * kv + 3 * d * f)


def backbone_flops(model_config: Any, n_sequences: int, seq_len: int, lm_head: bool) -> int:
    """Forward + backward FLOPs of the backbone over ``n_sequences`` sequences of ``seq_len`` tokens.

    Args:
        model_config: A [`picomaml.PicoDecoderConfig`][picomaml.model.config.PicoDecoderConfig] (or a dict
            with its fields).
        n_sequences: Sequences in the batch.
        seq_len: Tokens per sequence (the model input length).
        lm_head: Count the vocabulary projection (AR steps) or not (meta steps pool hidden states).
    """
    check_int("n_sequences", n_sequences, ge=1)
    check_int("seq_len", seq_len, ge=1)
    d, _, _, v, n_layers = _model_dims(model_config)
    tokens = n_sequences * seq_len
    weights = body_matmul_params(model_config) + (d * v if lm_head else 0)
    return 6 * tokens * weights + 12 * n_layers * seq_len * d * tokens


def ar_step_flops(model_config: Any, batch_size: int, seq_len: int) -> int:
    """FLOPs of one next-token step: forward and backward over ``batch_size`` rows of ``seq_len`` inputs.

    ``6 * B L * (P_body + d V) + 12 * n_layers * L * d * B L`` (see the module docstring). ``seq_len`` is
    the number of input tokens per row (the trainer's rows hold ``seq_len + 1`` tokens for ``seq_len``
    predictions).
    """
    return backbone_flops(model_config, batch_size, seq_len, lm_head=True)


def head_matmul_params(in_dim: int, n_way: int, head_hidden_dims: Sequence[int] = ()) -> int:
    """Matmul weights of a [`picomaml.MetaHead`][picomaml.meta.head.MetaHead] ``in_dim -> hidden... -> n_way``
    (biases left out)."""
    dims = [check_int("in_dim", in_dim, ge=1), *(check_int("head_hidden_dims", h, ge=1) for h in head_hidden_dims)]
    dims.append(check_int("n_way", n_way, ge=2))
    return sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def inner_loop_flops(
    in_dim: int,
    n_way: int,
    k_shot: int,
    n_query: int,
    head_hidden_dims: Sequence[int] = (),
    inner_steps: int = 5,
    first_order: bool = False,
    input_grads: bool = False,
) -> int:
    """FLOPs of the head's inner loop and query loss (forward + outer backward) for one task.

    ``steps * s + 3q`` first order, ``steps * 3s + 3q`` second order, with ``s = 3c - c_1``,
    ``c = 2 P_h N K``, ``c_1 = 2 D h_1 N K`` and ``q = 2 P_h N Q`` (see the module docstring);
    ``input_grads`` (adapted blocks below the head): ``s = 3c``.
    """
    check_int("k_shot", k_shot, ge=1)
    check_int("n_query", n_query, ge=1)
    check_int("inner_steps", inner_steps, ge=0)
    p_h = head_matmul_params(in_dim, n_way, head_hidden_dims)
    p_1 = in_dim * (head_hidden_dims[0] if len(head_hidden_dims) else n_way)
    c, c_1, q = 2 * p_h * n_way * k_shot, 2 * p_1 * n_way * k_shot, 2 * p_h * n_way * n_query
    step = 3 * c - (0 if input_grads else c_1)
    return inner_steps * (step if first_order else 3 * step) + 3 * q


def adapted_blocks_flops(
    model_config: Any,
    adapt_layers: int,
    n_way: int,
    k_shot: int,
    n_query: int,
    window_len: int,
    inner_steps: int = 5,
    first_order: bool = False,
) -> int:
    """FLOPs of the ``adapt_layers`` top blocks in one task's inner loop, query loss and metrics.

    ``(3 steps + 2) f_s + 4 f_q`` first order, ``(9 steps + 1) f_s + 4 f_q`` second order (see the module
    docstring). Zero for ``adapt_layers=0``.
    """
    d, kv, f, _, n_layers = _model_dims(model_config)
    k = check_int("adapt_layers", adapt_layers, ge=0, le=n_layers)
    check_int("inner_steps", inner_steps, ge=0)
    if k == 0:
        return 0
    w = check_int("window_len", window_len, ge=1)
    per_block = 2 * d * d + 2 * d * kv + 3 * d * f

    def forward(rows: int) -> int:
        return 2 * rows * w * k * per_block + 4 * k * w * w * d * rows

    ns, nq = n_way * check_int("k_shot", k_shot, ge=1), n_way * check_int("n_query", n_query, ge=1)
    f_s, f_q = forward(ns), forward(nq)
    if first_order:
        inner = f_s + inner_steps * 3 * f_s
    else:
        inner = inner_steps * 9 * f_s + (f_s if inner_steps == 0 else 0)
    return inner + 3 * f_q + f_q + f_s


def task_lora_flops(
    model_config: Any,
    lora_targets: Sequence[str],
    n_way: int,
    k_shot: int,
    n_query: int,
    window_len: int,
    inner_steps: int = 5,
    first_order: bool = False,
) -> int:
    """FLOPs that per-task LoRA factors on ``lora_targets`` add to one task of a head-only meta step (see the
    module docstring): ``steps (2 m_s + 3 a_s + g_s) + r`` first order, ``steps (6 m_s + 9 a_s + 3 g_s) - (m_s + a_s) + r``
    second order."""
    from picomaml.meta.task_lora import target_shapes

    steps = check_int("inner_steps", inner_steps, ge=0)
    if steps == 0:
        return 0
    d, _, _, _, n_layers = _model_dims(model_config)
    w, body = check_int("window_len", window_len, ge=1), body_matmul_params(model_config)

    def forward(rows: int) -> tuple[int, int]:  # weight matmuls, attention products of two activations
        return 2 * rows * w * body, 4 * n_layers * w * w * d * rows

    (m_s, a_s), (m_q, a_q) = forward(n_way * check_int("k_shot", k_shot, ge=1)), forward(n_way * check_int("n_query", n_query, ge=1))
    g_s = 2 * n_way * k_shot * w * n_layers * sum(i * o for i, o in target_shapes(model_config, lora_targets))
    # the metric forwards (query before, support after adaptation) less what the head-only step counts
    # that this path does not run (the support rows' backward)
    rest = (m_q + a_q) - (m_s + a_s)
    if first_order:
        return steps * (2 * m_s + 3 * a_s + g_s) + rest
    return steps * (6 * m_s + 9 * a_s + 3 * g_s) - (m_s + a_s) + rest


def meta_step_flops(
    model_config: Any,
    n_way: int,
    k_shot: int,
    n_query: int,
    window_len: int,
    n_tasks: int = 1,
    head_hidden_dims: Sequence[int] = (),
    inner_steps: int = 5,
    first_order: bool = False,
    adapt_layers: int = 0,
    grad_blocks: int | None = None,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
) -> int:
    """FLOPs of one meta step: the backbone over ``T N (K + Q)`` windows (no LM head) plus ``T`` inner loops.

    Args:
        model_config: A [`picomaml.PicoDecoderConfig`][picomaml.model.config.PicoDecoderConfig] (or a dict
            with its fields).
        n_way: Classes per task ``N``.
        k_shot: Support windows per class ``K``.
        n_query: Query windows per class ``Q``.
        window_len: Tokens per window ``W``.
        n_tasks: Tasks per meta step ``T``.
        head_hidden_dims: Hidden sizes of the [`picomaml.MetaHead`][picomaml.meta.head.MetaHead] (``()`` is
            linear).
        inner_steps: Inner SGD steps.
        first_order: FOMAML (``s`` per inner step) instead of second order (``3 s``).
        adapt_layers: Top blocks adapted with the head (see
            [`adapted_blocks_flops`][picomaml.eval.flops.adapted_blocks_flops]).
        grad_blocks: Top blocks the meta gradient reaches (``meta.grad_blocks``): the backbone's backward
            runs through those only (without ``adapt_layers``); ``None``: every block.
        lora_rank: Per-task LoRA factors on ``lora_targets`` adapt with the head (``meta.lora_rank``; see
            [`task_lora_flops`][picomaml.eval.flops.task_lora_flops]); ``0``: none.
        lora_targets: The layers that carry them (``meta.lora_targets``).

    Returns:
        FLOPs as an integer.
    """
    check_int("n_way", n_way, ge=2)
    check_int("n_tasks", n_tasks, ge=1)
    d, _, _, _, n_layers = _model_dims(model_config)
    k = check_int("adapt_layers", adapt_layers, ge=0, le=n_layers)
    windows = n_tasks * n_way * (check_int("k_shot", k_shot, ge=1) + check_int("n_query", n_query, ge=1))
    w = check_int("window_len", window_len, ge=1)
    if k == 0 and grad_blocks is not None and grad_blocks < n_layers:  # forward everywhere, backward on top
        g = check_int("grad_blocks", grad_blocks, ge=0)
        body = backbone_flops(model_config, windows, w, lm_head=False) // 3
        body += 2 * backbone_flops(_with_layers(model_config, g), windows, w, lm_head=False) // 3 if g else 0
    elif k == 0:
        body = backbone_flops(model_config, windows, w, lm_head=False)
    elif k == n_layers:
        body = 0
    else:  # forward over every window; backward over the support windows only when a gradient needs them
        lower = _with_layers(model_config, n_layers - k)
        support, query = n_tasks * n_way * k_shot, n_tasks * n_way * n_query
        body = backbone_flops(lower, query, w, lm_head=False) + backbone_flops(lower, support, w, lm_head=False) // (
            1 if not first_order and inner_steps > 0 else 3
        )
    lora = bool(check_int("lora_rank", lora_rank, ge=0))
    head = inner_loop_flops(d, n_way, k_shot, n_query, head_hidden_dims, inner_steps, first_order, input_grads=k > 0 or lora)
    blocks = adapted_blocks_flops(model_config, k, n_way, k_shot, n_query, w, inner_steps, first_order)
    if lora:
        blocks += task_lora_flops(model_config, lora_targets, n_way, k_shot, n_query, w, inner_steps, first_order)
    return body + n_tasks * (head + blocks)


def _with_layers(model_config: Any, n_layers: int) -> dict[str, int]:
    """The dims of ``model_config`` with another number of blocks (a dict `_model_dims` reads)."""
    d, kv, f, v, _ = _model_dims(model_config)
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k)
    return {"d_model": d, "n_heads": int(get("n_heads")), "n_kv_heads": int(get("n_kv_heads")), "ffn_dim": f,
            "vocab_size": v, "n_layers": n_layers}  # fmt: skip
