"""Per-task LoRA factors (TaskLoRA, HybridLearner(lora_rank=)): the plain backbone outside the inner loop, the
factors adapted per task, exact meta-gradients through them into the backbone."""

from __future__ import annotations

import pytest
import torch
from test_adapted_features import N, episode, finite_difference_check, pico

import picomaml as pm
from picomaml.meta.learner import HybridLearner
from picomaml.meta.task_lora import TaskLoRA, lora_params, lora_targets


def test_zero_factors_give_the_backbones_own_hidden_states_and_leave_it_unchanged():
    model = pico()
    keys = set(model.state_dict())
    lora = TaskLoRA(model, 2, targets=["q_proj", "*_proj"], seed=1).double()
    ids = torch.randint(3, 40, (4, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(lora.hidden_states(ids), model.hidden_states(ids))
    assert set(model.state_dict()) == keys and len(list(lora.parameters())) == 2 * 7 * 2  # 7 linears per block
    assert not any(p.requires_grad for p in lora.parameters())
    with torch.no_grad():  # a non-zero B changes the merged weights, never the backbone's own
        lora.factors["layers_1_attention_v_proj_B"].fill_(0.5)
    assert not torch.allclose(lora.hidden_states(ids), model.hidden_states(ids))
    assert torch.equal(pico().layers[1].attention.v_proj.weight, model.layers[1].attention.v_proj.weight)


def test_the_inner_loop_adapts_the_factors_and_meta_gradients_reach_the_backbone_exactly():
    model, head, ep = pico(), pm.MetaHead(16, N, hidden_dims=(8,), init="xavier").double(), episode(n_tasks=2)
    lora = TaskLoRA(model, 2).double()
    loop = pm.InnerLoop(steps=2, lr=0.5)
    out = pm.meta_loss(lora, head, loop, ep, adapt=list(lora.names))
    b = out.params["factors.layers_0_attention_q_proj_B"]
    assert b.shape == (2, 16, 2) and b.abs().max() > 0  # per task, moved from zero
    head_only = pm.meta_loss(model, head, loop, ep)
    assert not torch.allclose(out.loss, head_only.loss)
    out.loss.backward()
    assert all(p.grad is None for p in lora.parameters())  # fixed inits: not meta-learned
    named = {n: p for n, p in model.named_parameters() if n in ("embed_tokens.weight", "layers.0.attention.q_proj.weight",
                                                              "layers.1.mlp.down_proj.weight")}  # fmt: skip
    named["head.out.weight"] = head.out.weight
    grads = {n: p.grad.clone() for n, p in named.items()}
    finite_difference_check(lambda: pm.meta_loss(lora, head, loop, ep, adapt=list(lora.names)).loss, named, grads)


def test_hybrid_learner_with_lora_rank_runs_the_meta_loss_on_its_factors():
    model, head, ep = pico(), pm.MetaHead(16, N, init="xavier").double(), episode()
    loop = pm.InnerLoop(steps=1, lr=0.5)
    learner = HybridLearner(model, head, loop, lora_rank=3, lora_targets=("v_proj",), seed=4).double()
    assert learner.lora.names == ("factors.layers_0_attention_v_proj_A", "factors.layers_0_attention_v_proj_B",
                                  "factors.layers_1_attention_v_proj_A", "factors.layers_1_attention_v_proj_B")  # fmt: skip
    ref = TaskLoRA(model, 3, ("v_proj",), seed=4).double()
    expected = pm.meta_loss(ref, head, loop, ep, adapt=list(ref.names)).loss
    torch.testing.assert_close(learner(episode=ep).meta.loss, expected)
    rows = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(learner(rows=rows).lm_loss, pm.lm_loss(model, rows))  # AR: the plain backbone
    with pytest.raises(ValueError, match="lora_rank: .*not with adapt_layers"):
        HybridLearner(model, head, loop, lora_rank=2, adapt_layers=1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, "rank: must be an integer >= 1"),
    ({"rank": 2, "targets": ["qproj"]}, r"'qproj' matches no linear layer of PicoDecoder \(its linear layers are named"),
    ({"rank": 2, "targets": []}, "non-empty list"),
    ({"rank": 2, "alpha": 0.0}, "alpha"),
])  # fmt: skip
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskLoRA(pico(), **kwargs)


def test_lora_params_counts_the_factors_of_the_targets():
    model = pico()
    for targets in (("q_proj", "v_proj"), ("*_proj",), ("down_proj",)):
        lora = TaskLoRA(model, 3, targets)
        assert lora_params(model.config, 3, targets) == sum(p.numel() for p in lora.parameters())
        assert len(lora_targets(model, targets)) == len(lora.names) // 2


def test_targets_are_looked_for_inside_the_blocks_only():
    model = pico()
    lora = TaskLoRA(model, 2, targets=["*"])  # never the LM head (tied to the embedding) or anything else
    assert lora.names and all(n.startswith("factors.layers_") for n in lora.names)
    assert len(lora.names) == 2 * 7 * 2
