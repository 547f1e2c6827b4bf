"""pico-train checkpoints import into PicoDecoder with equal logits, checked against pico-train's own code.

pico-train's decoder (``src/model/pico_decoder.py`` and ``src/config/`` at f0bfdf4) is unpacked from
``../shared/clients`` into a temporary folder and imported from there; nothing of it is copied into this
repository. Its modules import only torch and transformers, so no stub modules are needed.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import json
import shutil
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import picomaml as pm
from picomaml.model.layers import apply_rope, rope_tables
from picomaml.model.pico_train import pico_train_key, rope_pair_permutation

CLIENTS = Path(__file__).resolve().parents[3] / "shared" / "clients"
ARCHIVE = CLIENTS / "pico-train-f0bfdf4-model.tar.gz"
if not CLIENTS.is_dir():
    pytest.skip(f"{CLIENTS} is absent: pico-train's model code is not available", allow_module_level=True)
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4  # the contract: max abs logits difference
V, L = 61, 20
BASE = dict(
    d_model=32, n_layers=2, vocab_size=V, max_seq_len=24, attention_n_heads=4, attention_n_kv_heads=2,
    activation_hidden_dim=48, batch_size=2, norm_eps=1e-5, position_emb_theta=500.0,
)  # fmt: skip


@pytest.fixture(scope="session")
def pico_train_root(tmp_path_factory) -> Path:
    """pico-train's snapshot, unpacked once per session."""
    dest = tmp_path_factory.mktemp("clients")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(dest, filter="data")
    return dest / "pico-train"


def _is_src(name: str) -> bool:
    return name == "src" or name.startswith("src.")


@pytest.fixture(scope="module")
def pt(pico_train_root):
    """pico-train's ``src.config`` and ``src.model.pico_decoder``, imported from the unpacked folder.

    pico-train's package is called ``src`` (so is pico-analyze's): any other ``src`` is set aside while
    this module runs and put back after. The modules stay in ``sys.modules`` meanwhile because
    ``save_pretrained`` copies the model's source file by looking its module up there.
    """
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_src(name)}
    sys.path.insert(0, str(pico_train_root))
    try:
        config = importlib.import_module("src.config")
        decoder = importlib.import_module("src.model.pico_decoder")
        yield SimpleNamespace(
            ModelConfig=config.ModelConfig, PicoDecoder=decoder.PicoDecoder, RoPE=decoder.RoPE
        )
    finally:
        sys.path.remove(str(pico_train_root))
        for name in [n for n in sys.modules if _is_src(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def build(pt, seed: int = 0, **overrides):
    """A random-init pico-train decoder (eval mode) and its ModelConfig."""
    cfg = pt.ModelConfig(**{**BASE, **overrides})
    # pico-train caches the first RoPE table it builds in a class attribute and hands it to every later
    # model in the process, whatever its head_dim, max_seq_len or theta: clear it so each model gets its own.
    pt.RoPE._freqs_cis_tensor = None
    torch.manual_seed(seed)
    model = pt.PicoDecoder(cfg).eval()
    with torch.no_grad():  # norm gains away from 1, so a swapped or dropped norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return model, cfg


def save(model, folder: Path) -> Path:
    """Save as pico-train does: its HF wrapper's ``save_pretrained``."""
    model.convert_to_hf_model().save_pretrained(folder)
    return folder


def ids(seed: int = 1) -> torch.Tensor:
    # L > 1: pico-train's forward builds no mask for one token and then calls mask.to() on None
    return torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(ours: pm.PicoDecoder, theirs, x: torch.Tensor) -> float:
    ref = theirs(x)[0]
    assert ref.abs().max() > 1.0  # not a degenerate comparison
    return (ours.eval()(x) - ref).abs().max().item()


@pytest.fixture(scope="module")
def gqa(pt, tmp_path_factory):
    """The GQA model, its config and its saved HF folder."""
    model, cfg = build(pt)
    folder = save(model, tmp_path_factory.mktemp("pico_gqa"))
    return SimpleNamespace(model=model, cfg=cfg, folder=folder)


CASES = {
    "gqa": {},
    "mha": dict(attention_n_kv_heads=4),
    "mqa": dict(attention_n_heads=8, attention_n_kv_heads=1, d_model=48, activation_hidden_dim=40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folder_logits_match(pt, tmp_path, case):
    model, cfg = build(pt, **CASES[case])
    folder = save(model, tmp_path)
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "pico_decoder" and written["architectures"] == ["PicoDecoderHF"]
    ours = pm.PicoDecoder.from_pico_train(folder)
    c = ours.config
    assert (c.d_model, c.n_layers, c.vocab_size, c.max_seq_len) == (cfg.d_model, cfg.n_layers, V, 24)
    assert (c.n_heads, c.n_kv_heads, c.ffn_dim) == (
        cfg.attention_n_heads,
        cfg.attention_n_kv_heads,
        cfg.activation_hidden_dim,
    )
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings) == (500.0, 1e-5, False)
    assert max_diff(ours, model, ids()) <= TOL


CONFIGS = {
    "dataclass dict": lambda cfg: dataclasses.asdict(cfg),
    "dataclass": lambda cfg: cfg,
    "heads only (+ theta, eps)": lambda cfg: dict(
        attention_n_heads=4, norm_eps=1e-5, position_emb_theta=500.0
    ),
    "PicoDecoderConfig": lambda cfg: pm.PicoDecoderConfig(
        vocab_size=V, d_model=32, n_heads=4, ffn_dim=48, max_seq_len=24, rope_theta=500.0, norm_eps=1e-5
    ),
}


@pytest.mark.parametrize("how", list(CONFIGS))
def test_raw_state_dict_logits_match(gqa, how):
    ours = pm.PicoDecoder.from_pico_train(gqa.model.state_dict(), config=CONFIGS[how](gqa.cfg))
    assert max_diff(ours, gqa.model, ids()) <= TOL
    from_folder = pm.PicoDecoder.from_pico_train(gqa.folder)
    if how != "heads only (+ theta, eps)":  # that one takes pico-train's default max_seq_len
        assert ours.config == from_folder.config


def test_prefixed_state_dict_and_weights_files(gqa, tmp_path):
    hf_state = gqa.model.convert_to_hf_model().state_dict()
    assert all(k.startswith("pico_decoder.") for k in hf_state)
    x = ids()
    assert max_diff(pm.PicoDecoder.from_pico_train(hf_state, config=gqa.cfg), gqa.model, x) <= TOL
    # a folder with pytorch_model.bin (read with weights_only=True) instead of safetensors
    shutil.copy(gqa.folder / "config.json", tmp_path / "config.json")
    torch.save(hf_state, tmp_path / "pytorch_model.bin")
    assert max_diff(pm.PicoDecoder.from_pico_train(tmp_path), gqa.model, x) <= TOL
    # a lone weights file is a raw state dict: it needs the config
    weights = gqa.folder / "model.safetensors"
    assert max_diff(pm.PicoDecoder.from_pico_train(weights, config=gqa.cfg), gqa.model, x) <= TOL
    with pytest.raises(ValueError, match="attention_n_heads"):
        pm.PicoDecoder.from_pico_train(weights)


def test_raw_state_dict_needs_the_head_count(gqa):
    with pytest.raises(ValueError, match="attention_n_heads"):
        pm.PicoDecoder.from_pico_train(gqa.model.state_dict())
    with pytest.raises(ValueError, match="attention_n_heads"):
        pm.PicoDecoder.from_pico_train(gqa.model.state_dict(), config={"d_model": 32})


def test_dtype_kept_and_global_rng_untouched(gqa):
    state = {k: v.to(torch.bfloat16) for k, v in gqa.model.state_dict().items()}
    before = torch.get_rng_state()
    ours = pm.PicoDecoder.from_pico_train(state, config=gqa.cfg)
    assert torch.equal(before, torch.get_rng_state())
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


@pytest.fixture
def no_prompt(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"an interactive prompt was raised: {args}")

    monkeypatch.setattr(builtins, "input", refuse)


def test_from_hf_routes_pico_train_folder_without_prompt(gqa, no_prompt):
    config = json.loads((gqa.folder / "config.json").read_text())
    # the folder asks for remote code: transformers alone would need trust_remote_code for it
    assert config["auto_map"]["AutoModelForCausalLM"] == "pico_decoder.PicoDecoderHF"
    assert (gqa.folder / "pico_decoder.py").is_file()
    via_hf = pm.PicoDecoder.from_hf(gqa.folder)
    direct = pm.PicoDecoder.from_pico_train(gqa.folder)
    assert via_hf.config == direct.config
    for key, value in direct.state_dict().items():
        assert torch.equal(via_hf.state_dict()[key], value), key
    assert max_diff(via_hf, gqa.model, ids()) <= TOL
    # an already loaded PicoDecoderHF (the caller ran pico-train's code, not picomaml) routes too
    loaded = pm.PicoDecoder.from_hf(gqa.model.convert_to_hf_model())
    assert max_diff(loaded, gqa.model, ids()) <= TOL


def test_from_hf_refuses_other_model_types(tmp_path, no_prompt):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match=r"'gpt2'.*'llama'.*'pico_decoder'"):
        pm.PicoDecoder.from_hf(tmp_path)
    with pytest.raises(ValueError, match="not a pico-train checkpoint.*'gpt2'"):
        pm.PicoDecoder.from_pico_train(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        pm.PicoDecoder.from_hf(tmp_path)


def test_from_hf_still_imports_llama_folders(tmp_path, no_prompt):
    m = pm.PicoDecoder(pm.PicoDecoderConfig(vocab_size=V, d_model=32, n_heads=4, ffn_dim=48, max_seq_len=24))
    m.to_hf().save_pretrained(tmp_path)
    back = pm.PicoDecoder.from_hf(tmp_path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)


def _renamed(state: dict, old: str, new: str | None) -> dict:
    state = dict(state)
    value = state.pop(old)
    if new is not None:
        state[new] = value
    return state


BAD = {
    "unknown key": (
        lambda s: _renamed(s, "layers.1.swiglu.w_2.weight", "layers.1.swiglu.w_3.weight"),
        "'layers.1.swiglu.w_3.weight' is not a weight",
    ),
    "missing key": (lambda s: _renamed(s, "output_norm.weight", None), "missing key.*'output_norm.weight'"),
    "layer beyond n_layers": (
        lambda s: {**s, "layers.2.attention_norm.weight": torch.ones(32)},
        "unexpected key.*'layers.2.attention_norm.weight'.*n_layers=2",
    ),
    "wrong shape": (
        lambda s: {**s, "layers.0.swiglu.w_1.weight": torch.zeros(40, 32)},
        r"'layers.0.swiglu.w_1.weight' has shape \(40, 32\).*needs \(48, 32\)",
    ),
    "not a tensor": (lambda s: {**s, "output_norm.weight": [1.0] * 32}, "'output_norm.weight' holds a list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_dict_names_the_key(gqa, case):
    corrupt, match = BAD[case]
    with pytest.raises((ValueError, TypeError), match=match):
        pm.PicoDecoder.from_pico_train(corrupt(gqa.model.state_dict()), config=dataclasses.asdict(gqa.cfg))


BAD_CONFIGS = {
    "kv heads disagree with k_proj": (
        dict(attention_n_kv_heads=1),
        r"'layers.0.attention.k_proj.weight' has shape \(16, 32\).*attention_n_kv_heads=1",
    ),
    "vocab disagrees": (dict(vocab_size=V + 1), "'embedding_proj.weight' has shape"),
    "unknown config key": (dict(n_heads=4), "unknown pico-train model config key.*'n_heads'"),
    "other model_type": (dict(model_type="llama"), "model_type 'llama'"),
    "bad value": (dict(attention_n_heads=0), "config.attention_n_heads: must be an integer >= 1"),
    "heads do not divide d_model": (dict(attention_n_heads=5), "not divisible"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_named(gqa, case):
    overrides, match = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=match):
        pm.PicoDecoder.from_pico_train(
            gqa.model.state_dict(), config={**dataclasses.asdict(gqa.cfg), **overrides}
        )


def test_folder_rejects_a_second_config(gqa):
    with pytest.raises(ValueError, match="config="):
        pm.PicoDecoder.from_pico_train(gqa.folder, config=gqa.cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pm.PicoDecoder.from_pico_train(gqa.folder / "missing")
    with pytest.raises(ValueError, match="never ties"):
        pm.PicoDecoder.from_pico_train(
            gqa.model.state_dict(), config=pm.PicoDecoderConfig(vocab_size=V, d_model=32, tie_embeddings=True)
        )


def test_renaming_without_the_rope_permutation_differs(gqa):
    """The permutation is what makes the logits equal: renaming alone loads but computes something else."""
    cfg = pm.PicoDecoder.from_pico_train(gqa.folder).config
    renamed = {pico_train_key(k): v for k, v in gqa.model.state_dict().items()}
    plain = pm.PicoDecoder(cfg)
    plain.load_state_dict(renamed)
    x = ids()
    assert max_diff(plain, gqa.model, x) > 1e-2
    perms = {"q": rope_pair_permutation(cfg.n_heads, cfg.head_dim)}
    perms["k"] = rope_pair_permutation(cfg.n_kv_heads, cfg.head_dim)
    for i in range(cfg.n_layers):
        for which, perm in perms.items():
            key = f"layers.{i}.attention.{which}_proj.weight"
            renamed[key] = renamed[key][perm]
    plain.load_state_dict(renamed)
    assert max_diff(plain, gqa.model, x) <= TOL


def test_rope_pair_permutation_turns_pair_rotation_into_rotate_half(pt):
    assert rope_pair_permutation(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ValueError, match="even"):
        rope_pair_permutation(1, 3)
    heads, head_dim, n = 3, 8, 10
    pt.RoPE._freqs_cis_tensor = None  # see build()
    rope = pt.RoPE(
        pt.ModelConfig(
            d_model=heads * head_dim, attention_n_heads=heads, max_seq_len=n, position_emb_theta=500.0
        )
    )
    pt.RoPE._freqs_cis_tensor = None
    q, k = torch.randn(2, n, heads, head_dim), torch.randn(2, n, 1, head_dim)
    q_rot, k_rot = rope(q, k)
    perm = rope_pair_permutation(1, head_dim)
    cos, sin = rope_tables(head_dim, n, 500.0)
    torch.testing.assert_close(apply_rope(q[..., perm], cos, sin), q_rot[..., perm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(apply_rope(k[..., perm], cos, sin), k_rot[..., perm], atol=1e-6, rtol=1e-6)
    # without the reorder the two conventions disagree
    assert (apply_rope(q, cos, sin) - q_rot).abs().max() > 1e-2
