"""InnerLoop (torch backend): exact meta-gradients, FOMAML, batching over tasks, purity, metrics, errors."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from picomaml.meta.head import MetaHead
from picomaml.meta.inner_loop import InnerLoop, accuracy

N, K, Q, D = 4, 3, 2, 6


def episode(t: int = 2, dtype=torch.float64, seed: int = 0, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(t, N * K, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
    xq = torch.randn(t, N * Q, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
    ys = torch.stack([torch.randperm(N, generator=g).repeat_interleave(K) for _ in range(t)])
    yq = torch.stack([torch.randperm(N, generator=g).repeat_interleave(Q) for _ in range(t)])
    return xs, ys, xq, yq


def make(hidden=(5,), init="xavier", act="tanh", **loop_kw):
    head = MetaHead(D, N, hidden_dims=hidden, activation=act, init=init, seed=1).double()
    loop = InnerLoop(head=head, **{"steps": 3, "lr": 0.4, **loop_kw}).double()
    return head, loop


def directional_fd(fn, tensor: torch.Tensor, direction: torch.Tensor, eps: float = 1e-5) -> float:
    with torch.no_grad():
        tensor.add_(eps * direction)
        up = fn().item()
        tensor.sub_(2 * eps * direction)
        down = fn().item()
        tensor.add_(eps * direction)
    return (up - down) / (2 * eps)


@pytest.mark.parametrize(
    ("hidden", "init", "act", "extra"),
    [
        ((5,), "xavier", "tanh", {"learn_lr": "per_step"}),
        ((5,), "prototype", "gelu", {"learn_lr": "per_tensor", "multi_step_loss": True}),
        ((), "xavier", "tanh", {"learn_lr": "per_step", "grad_clip": 0.5}),
    ],
)
def test_second_order_matches_finite_differences(hidden, init, act, extra) -> None:
    head, loop = make(hidden, init, act, **extra)
    xs, ys, xq, yq = episode()
    with torch.no_grad():  # spread the learned LRs so each one matters differently
        loop.lrs.mul_(torch.linspace(0.5, 1.5, loop.lrs.numel(), dtype=torch.float64).view_as(loop.lrs))

    def f():
        return loop(head, xs, ys, xq, yq).loss

    tensors = [*head.parameters(), loop.lrs, xs, xq]
    grads = torch.autograd.grad(f(), tensors)
    g = torch.Generator().manual_seed(5)
    for tensor, grad in zip(tensors, grads, strict=True):
        for _ in range(2):
            v = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype)
            fd = directional_fd(f, tensor, v)
            an = (grad * v).sum().item()
            assert abs(fd - an) <= 1e-6 * abs(an) + 1e-12, (tensor.shape, fd, an)


def test_first_order_is_fomaml() -> None:
    head, loop = make(first_order=True, learn_lr=None)
    xs, ys, xq, yq = episode(t=3)
    out = loop(head, xs, ys, xq, yq)
    params = list(head.parameters())
    meta = torch.autograd.grad(out.loss, params)
    # FOMAML: the gradient of each task's query loss at its adapted weights, averaged over tasks
    with torch.no_grad():
        adapted = loop.adapt(head, xs, ys)
    expected = [torch.zeros_like(p) for p in params]
    for t in range(3):
        leaves = {k: v[t].clone().requires_grad_() for k, v in adapted.items()}
        loss = torch.nn.functional.cross_entropy(head.functional(leaves, xq[t]), yq[t])
        for i, gr in enumerate(torch.autograd.grad(loss, list(leaves.values()))):
            expected[i] += gr / 3
    for a, b in zip(meta, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # and it is not the second-order gradient
    so = InnerLoop(steps=3, lr=0.4)(head, xs, ys, xq, yq)
    assert not torch.allclose(torch.autograd.grad(so.loss, params)[0], meta[0], rtol=1e-6)
    # FO sends no gradient into the support features through the inner steps
    assert torch.autograd.grad(out.loss, xs, allow_unused=True)[0] is None


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("init", ["xavier", "prototype"])
def test_closed_form_matches_general_path(first_order: bool, init: str) -> None:
    head = MetaHead(D, N, init=init).double()
    xs, ys, xq, yq = episode(t=3)
    outs = []
    for closed in (True, False):
        loop = InnerLoop(steps=4, lr=0.7, first_order=first_order, closed_form=closed, grad_clip=2.0)
        out = loop(head, xs, ys, xq, yq)
        grads = torch.autograd.grad(out.loss, [*head.parameters(), xs, xq], allow_unused=True)
        outs.append((out.loss, [g for g in grads if g is not None], out.params))
    (l1, g1, p1), (l2, g2, p2) = outs
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-12, atol=1e-14)


def test_closed_form_is_chosen_only_where_it_applies() -> None:
    lin, mlp = MetaHead(D, N), MetaHead(D, N, hidden_dims=(4,))
    assert InnerLoop(2, 0.1)._use_closed_form(lin) and not InnerLoop(2, 0.1)._use_closed_form(mlp)
    assert not InnerLoop(2, 0.1, closed_form=False)._use_closed_form(lin)
    with pytest.raises(ValueError, match="closed_form"):
        InnerLoop(2, 0.1, closed_form=True)._use_closed_form(mlp)


def test_tasks_at_once_equal_separate_calls() -> None:
    head, loop = make(hidden=(5,), init="prototype", act="relu", learn_lr="per_step", multi_step_loss=True)
    xs, ys, xq, yq = episode(t=3)
    out = loop(head, xs, ys, xq, yq)
    params = [*head.parameters(), loop.lrs]
    batched = torch.autograd.grad(out.loss, [*params, xs, xq])
    losses = []
    for t in range(3):
        o = loop(head, xs[t], ys[t], xq[t], yq[t])
        losses.append(o.loss)
        for k, v in o.params.items():
            torch.testing.assert_close(v, out.params[k][t], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(o.query_logits, out.query_logits[t], rtol=1e-12, atol=1e-14)
    separate = torch.autograd.grad(torch.stack(losses).mean(), [*params, xs, xq])
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-13, atol=0)
    for a, b in zip(batched, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_prototype_loss_is_invariant_to_label_permutation() -> None:
    head, loop = make(hidden=(5,), init="prototype", act="relu", steps=5)
    xs, ys, xq, yq = episode(t=1)
    base = loop(head, xs, ys, xq, yq).loss
    perm = torch.tensor([2, 0, 3, 1])
    rows_s, rows_q = torch.randperm(N * K), torch.randperm(N * Q)
    out = loop(head, xs[:, rows_s], perm[ys][:, rows_s], xq[:, rows_q], perm[yq][:, rows_q])
    torch.testing.assert_close(out.loss, base, rtol=1e-12, atol=1e-14)
    # a learned output layer is not invariant: the check can fail
    head2, loop2 = make(hidden=(5,), init="xavier", act="relu", steps=5)
    assert not torch.allclose(
        loop2(head2, xs, perm[ys], xq, perm[yq]).loss, loop2(head2, xs, ys, xq, yq).loss
    )


def test_head_is_never_mutated_and_adapt_creates_no_grad() -> None:
    head, loop = make(learn_lr="per_tensor")
    before = {k: v.detach().clone() for k, v in head.state_dict().items() if torch.is_tensor(v)}
    xs, ys, xq, yq = episode()
    adapted = loop.adapt(head, xs, ys)
    assert all(p.grad is None for p in [*head.parameters(), *loop.parameters(), xs, xq])
    assert any(not torch.equal(adapted[k], v) for k, v in head.initial_params().items())
    out = loop(head, xs, ys, xq, yq)
    assert all(p.grad is None for p in [*head.parameters(), *loop.parameters()])
    out.loss.backward()
    for k, v in head.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k  # bit-identical
    assert all(p.grad is not None for p in head.parameters())


def test_adapt_under_no_grad_still_adapts() -> None:
    head, loop = make()
    xs, ys, xq, yq = episode(requires_grad=False)
    with torch.no_grad():
        adapted = loop.adapt(head, xs, ys)
        out = loop(head, xs, ys, xq, yq)
    assert all(not v.requires_grad for v in adapted.values())
    assert out.metrics["support_loss_after"] < out.metrics["support_loss_before"]
    with torch.enable_grad():
        ref = loop.adapt(head, xs, ys)
    for k in adapted:
        torch.testing.assert_close(adapted[k], ref[k].detach(), rtol=1e-12, atol=1e-14)


def test_metrics_are_detached_scalar_tensors_and_consistent() -> None:
    head, loop = make(learn_lr="per_step", steps=4)
    xs, ys, xq, yq = episode(t=2)
    out = loop(head, xs, ys, xq, yq)
    m = out.metrics
    # nothing is read from the device: the caller reads them when it logs
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in m.values())
    for key in ("support_loss_before", "support_loss_after", "support_acc_before", "support_acc_after",
                "query_loss", "query_acc", "query_acc_before", "inner_grad_norm", "inner_lr"):  # fmt: skip
        assert key in m
    assert [f"inner_grad_norm_{s}" in m for s in range(4)] == [True] * 4
    assert f"inner_lr/{head.adapted_names[0]}" in m
    assert m["query_acc"] == pytest.approx(accuracy(out.query_logits, yq).item())
    assert m["query_loss"] == pytest.approx(out.loss.item())
    assert m["support_loss_after"] < m["support_loss_before"]
    assert accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])).item() == 0.5


def test_multi_step_loss_is_mean_of_per_step_query_losses() -> None:
    head, _ = make()
    xs, ys, xq, yq = episode()
    out = InnerLoop(steps=3, lr=0.4, multi_step_loss=True)(head, xs, ys, xq, yq)
    per = [InnerLoop(steps=s, lr=0.4)(head, xs, ys, xq, yq).loss for s in (1, 2, 3)]
    torch.testing.assert_close(out.loss, torch.stack(per).mean(), rtol=1e-12, atol=1e-14)


def test_grad_clip_bounds_each_step() -> None:
    head, _ = make(hidden=())
    xs, ys, _, _ = episode(t=1)
    loop = InnerLoop(steps=1, lr=1.0, grad_clip=1e-3, closed_form=False)
    adapted = loop.adapt(head, xs, ys)
    delta = torch.cat([(adapted[k][0] - v).flatten() for k, v in head.initial_params().items()])
    assert delta.norm().item() == pytest.approx(1e-3, rel=1e-5)


def test_learned_lrs_need_binding_and_have_stable_names() -> None:
    head = MetaHead(D, N, hidden_dims=(5,))
    loop = InnerLoop(steps=2, lr=0.1, learn_lr="per_step")
    xs, ys, xq, yq = episode(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="bind"):
        loop(head, xs, ys, xq, yq)
    loop.bind(head)
    assert list(loop.state_dict()) == ["lrs"] and loop.lrs.shape == (2, 4)
    assert torch.equal(loop.lrs, torch.full((2, 4), 0.1))
    with pytest.raises(ValueError, match="bound"):
        loop.bind(MetaHead(D, N, hidden_dims=(5, 5)))
    assert list(InnerLoop(2, 0.1).parameters()) == []
    assert InnerLoop(2, 0.1, learn_lr="per_tensor", head=head).lrs.shape == (4,)


def test_autocast_bf16_gives_finite_loss() -> None:
    for hidden in [(), (8, 8)]:
        head = MetaHead(D, N, hidden_dims=hidden)
        xs, ys, xq, yq = episode(dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = InnerLoop(steps=3, lr=0.5)(head, xs, ys, xq, yq)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_zero_steps_scores_the_initial_head() -> None:
    head, _ = make()
    xs, ys, xq, yq = episode()
    out = InnerLoop(steps=0, lr=0.1)(head, xs, ys, xq, yq)
    ref = torch.nn.functional.cross_entropy(head(xq).flatten(0, 1), yq.flatten())
    torch.testing.assert_close(out.loss, ref)
    assert out.metrics["query_acc"] == out.metrics["query_acc_before"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda e: (e[0], e[1] + N, e[2], e[3]), r"support_labels must be in \[0, 4\)"),
        (lambda e: (e[0], e[1], e[2], e[3] - 1), r"query_labels must be in \[0, 4\)"),
        (lambda e: (e[0][..., :-1], e[1], e[2], e[3]), "in_dim"),
        (lambda e: (e[0], e[1][:, :-1], e[2], e[3]), "support_labels has shape"),
        (lambda e: (e[0][:, :0], e[1][:, :0], e[2], e[3]), "support set is empty"),
        (lambda e: (e[0] * float("nan"), e[1], e[2], e[3]), "support_feats contains NaN"),
        (lambda e: (e[0], e[1], e[2] * float("inf"), e[3]), "query_feats contains NaN or Inf"),
        (lambda e: (e[0], e[1], e[2][:1], e[3][:1]), "tasks"),
        (lambda e: (e[0], e[1].float(), e[2], e[3]), "integer"),
    ],
)
def test_clear_errors(change, match) -> None:
    head, loop = make()
    xs, ys, xq, yq = change(episode(requires_grad=False))
    with pytest.raises(ValueError, match=match):
        loop(head, xs, ys, xq, yq)


def test_bad_constructor_arguments() -> None:
    for kwargs, match in [
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"backend": "jax"}, "backend"),
        ({"learn_lr": "per_weight"}, "learn_lr"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"backend": "higher"}, "test suite's independent references"),
        ({"backend": "learn2learn"}, "use backend='torch'|Use backend='torch'"),
    ]:
        with pytest.raises(ValueError, match=match):
            InnerLoop(**{"steps": 1, "lr": 0.1, **kwargs})


def test_ddp_one_backward(tmp_path) -> None:
    """Inside DDP the meta step is one forward and one backward: the reducer sees each parameter once."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = torch.nn.Linear(D, D)
            self.head = MetaHead(D, N, hidden_dims=(5,))
            self.loop = InnerLoop(steps=3, lr=0.5, learn_lr="per_tensor", head=self.head)

        def forward(self, xs, ys, xq, yq):
            return self.loop(self.head, self.backbone(xs), ys, self.backbone(xq), yq).loss

    xs, ys, xq, yq = episode(t=2, dtype=torch.float32, requires_grad=False)
    plain = Model()
    plain(xs, ys, xq, yq).backward()
    model = None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DDP(Model())
        model(xs, ys, xq, yq).backward()  # raises if a parameter were marked ready twice
        for (name, p), q in zip(model.module.named_parameters(), plain.parameters(), strict=True):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    finally:
        # Freeing the last DDP reference destroys gloo's process group, which joins its worker threads
        # while this thread holds the GIL; a worker still dropping a finished allreduce needs the GIL to
        # free that work's captured Python state, so the two wait for each other forever (seen once in
        # ~10 runs, at 0 % CPU). Sleeping releases the GIL so the workers finish first; then free the
        # model before the group.
        time.sleep(0.2)
        model = None
        gc.collect()
        dist.destroy_process_group()


def test_dropout_in_the_inner_loop_is_reproducible_from_the_head_state() -> None:
    head = MetaHead(D, N, hidden_dims=(16,), dropout=0.3, seed=4).double()
    loop = InnerLoop(steps=3, lr=0.4)
    xs, ys, xq, yq = episode()
    state = head.state_dict()
    first = loop(head, xs, ys, xq, yq).loss
    second = loop(head, xs, ys, xq, yq).loss
    assert not torch.equal(first, second)  # fresh masks each call
    head.load_state_dict(state)
    torch.testing.assert_close(loop(head, xs, ys, xq, yq).loss, first, rtol=0, atol=0)
    head.eval()  # no dropout: deterministic
    torch.testing.assert_close(
        loop(head, xs, ys, xq, yq).loss, loop(head, xs, ys, xq, yq).loss, rtol=0, atol=0
    )
