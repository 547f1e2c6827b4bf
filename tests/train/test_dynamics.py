"""Learning-dynamics capture on a tiny PicoDecoder: shapes, gradients checked independently, no side effects."""

from __future__ import annotations

import copy

import pytest
import torch

from picomaml.model.config import PicoDecoderConfig
from picomaml.model.decoder import PicoDecoder
from picomaml.train.checkpoint import load_checkpoint, save_checkpoint
from picomaml.train.dynamics import (
    capture_learning_dynamics,
    learning_dynamics_writer,
    load_learning_dynamics,
    next_token_loss,
    save_learning_dynamics,
    select_modules,
)

SUFFIXES = ("attention.o_proj", "mlp.down_proj")


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = PicoDecoderConfig(
        vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32, max_seq_len=16
    )
    return PicoDecoder(cfg).to(dtype)


def _batch():
    return torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))


def test_selects_the_configured_layers():
    names = list(select_modules(_model(), SUFFIXES))
    assert names == [
        "layers.0.attention.o_proj",
        "layers.0.mlp.down_proj",
        "layers.1.attention.o_proj",
        "layers.1.mlp.down_proj",
    ]
    with pytest.raises(ValueError, match="match no module"):
        select_modules(_model(), ["nonexistent"])
    with pytest.raises(ValueError, match="at least one"):
        select_modules(_model(), [])


def test_shapes_and_values():
    model, batch = _model(), _batch()
    data = capture_learning_dynamics(model, batch, SUFFIXES)
    assert set(data) == {"activations", "weights", "gradients"}
    for name in select_modules(model, SUFFIXES):
        assert data["activations"][name].shape == (3, 16)
        weight = model.get_submodule(name).weight
        assert torch.equal(data["weights"][name], weight.detach())
        assert data["weights"][name].data_ptr() != weight.data_ptr()  # a copy, not a view
        assert data["gradients"][name].shape == weight.shape

    # activations equal the module output at the chosen position (recorded by an independent hook)
    seen = {}
    target = model.get_submodule("layers.1.mlp.down_proj")
    h = target.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach()))
    with torch.no_grad():
        model(batch)
    h.remove()
    torch.testing.assert_close(data["activations"]["layers.1.mlp.down_proj"], seen["out"][:, -1])
    first = capture_learning_dynamics(model, batch, SUFFIXES, seq_idx=0)
    torch.testing.assert_close(first["activations"]["layers.1.mlp.down_proj"], seen["out"][:, 0])


def test_gradients_match_backward_and_finite_differences():
    model, batch = _model(torch.float64), _batch()
    data = capture_learning_dynamics(model, batch, SUFFIXES)
    # independent path 1: ordinary .backward() on a copy
    ref = copy.deepcopy(model)
    next_token_loss(ref, batch).backward()
    for name in select_modules(model, SUFFIXES):
        torch.testing.assert_close(
            data["gradients"][name], ref.get_submodule(name).weight.grad.float(), rtol=1e-5, atol=1e-8
        )
    # independent path 2: central finite difference of one weight entry, float64
    w = model.get_submodule("layers.0.attention.o_proj").weight
    eps = 1e-3  # the decoder's RMSNorm computes in float32, so a tiny eps would only measure its rounding
    with torch.no_grad():
        w[2, 3] += eps
        up = next_token_loss(model, batch).item()
        w[2, 3] -= 2 * eps
        down = next_token_loss(model, batch).item()
        w[2, 3] += eps
    fd = (up - down) / (2 * eps)
    assert data["gradients"]["layers.0.attention.o_proj"][2, 3].item() == pytest.approx(fd, rel=1e-3)


def test_leaves_training_state_untouched():
    model, batch = _model(), _batch()
    model.train()
    next_token_loss(model, batch).backward()  # accumulated training gradients
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    capture_learning_dynamics(model, batch, SUFFIXES)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), params[n])
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():  # works even when called under no_grad
        data = capture_learning_dynamics(model, batch, SUFFIXES)
    assert data["gradients"]["layers.0.mlp.down_proj"].abs().sum() > 0


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="batch"):
        capture_learning_dynamics(model, torch.zeros(10, dtype=torch.long), SUFFIXES)
    with pytest.raises(ValueError, match="seq_idx"):
        capture_learning_dynamics(model, _batch(), SUFFIXES, seq_idx=10)
    with pytest.raises(ValueError, match="split"):
        save_learning_dynamics("unused", "../evil", {})


def test_save_layout_and_checkpoint_writer(tmp_path):
    model, batch = _model(), _batch()
    train = capture_learning_dynamics(model, batch, SUFFIXES)
    val = capture_learning_dynamics(model, batch.flip(0), SUFFIXES)
    save_learning_dynamics(tmp_path, "train", train)
    files = sorted(p.name for p in (tmp_path / "learning_dynamics").iterdir())
    assert files == ["train_activations.pt", "train_gradients.pt", "train_weights.pt"]
    back = load_learning_dynamics(tmp_path, "train")
    for kind in train:
        assert back[kind].keys() == train[kind].keys()
        for name in train[kind]:
            assert torch.equal(back[kind][name], train[kind][name])

    root = tmp_path / "ckpts"
    path = save_checkpoint(
        root,
        5,
        {"model": model},
        fsync=False,
        writers={"learning_dynamics": learning_dynamics_writer({"train": train, "val": val})},
    )
    assert sorted(p.name for p in (path / "learning_dynamics").iterdir()) == [
        f"{s}_{k}.pt" for s in ("train", "val") for k in ("activations", "gradients", "weights")
    ]
    assert load_checkpoint(root).step == 5
    torch.testing.assert_close(
        load_learning_dynamics(path, "val")["activations"]["layers.0.mlp.down_proj"],
        val["activations"]["layers.0.mlp.down_proj"],
    )


def test_wrapped_models_are_unwrapped():
    model, batch = _model(), _batch()

    class OptimizedModule(torch.nn.Module):  # the name torch.compile's wrapper has
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            return self._orig_mod(x)

    wrapped = OptimizedModule(model)
    data = capture_learning_dynamics(wrapped, batch, SUFFIXES)
    assert "layers.0.mlp.down_proj" in data["weights"]
    ref = capture_learning_dynamics(model, batch, SUFFIXES)
    for name, g in ref["gradients"].items():
        assert torch.equal(data["gradients"][name], g)


def test_fabric_wrapped_model_keeps_clean_names():
    fabric_mod = pytest.importorskip("lightning.fabric")
    model = _model()
    wrapped = fabric_mod.Fabric(accelerator="cpu", devices=1).setup_module(model)
    data = capture_learning_dynamics(wrapped, _batch(), ["mlp.down_proj"])
    assert list(data["weights"]) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]


def test_fused_projections_are_captured_and_a_silent_module_is_an_error():
    """q/k/v and gate/up run inside one fused matmul, so their hooks never fire by themselves: their
    outputs are computed from the parent's input, and equal what the fused matmul computes."""
    model, batch = _model(), _batch()
    data = capture_learning_dynamics(model, batch, ["attention.v_proj", "mlp.gate_proj", "attention.q_proj"])
    for i, layer in enumerate(model.layers):
        x = layer.attention_norm(model.embed_tokens(batch)) if i == 0 else None
        if x is not None:
            torch.testing.assert_close(data["activations"]["layers.0.attention.v_proj"], layer.attention.v_proj(x)[:, -1])
    kv = model.config.n_kv_heads * model.config.head_dim
    assert data["activations"]["layers.1.attention.v_proj"].shape == (batch.shape[0], kv)
    assert data["activations"]["layers.0.mlp.gate_proj"].shape == (batch.shape[0], model.config.ffn_dim)
    assert data["gradients"]["layers.0.attention.v_proj"].abs().sum() > 0

    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, ids):
            return self.used(torch.nn.functional.one_hot(ids, 4).float())

    with pytest.raises(ValueError, match=r"layers: \['spare'\] produced no activations"):
        capture_learning_dynamics(Unused(), torch.randint(0, 4, (2, 5)), ["used", "spare"],
                                  loss_fn=lambda m, b: m(b).sum())  # fmt: skip


def test_a_compiled_backbone_is_captured_eagerly_without_compiling():
    from torch._dynamo.utils import counters

    from picomaml.train.compile import compile_backbone

    model = _model()
    ref = capture_learning_dynamics(copy.deepcopy(model), _batch(), SUFFIXES)
    compiled = compile_backbone(model)
    before = dict(counters["stats"])
    got = capture_learning_dynamics(compiled, _batch(), SUFFIXES)
    assert dict(counters["stats"]) == before  # no graph was traced for the hooked forward
    assert "forward" in vars(compiled)  # still compiled afterwards
    for kind in ("activations", "weights", "gradients"):
        assert got[kind].keys() == ref[kind].keys()
        for name in ref[kind]:
            torch.testing.assert_close(got[kind][name], ref[kind][name])
