"""Config values a careless edit produces: sizes that cannot fit, counts without end, wrong types, unknown
keys. Each must be refused before any allocation, naming the key. The trainer runs in a child process with
its address space capped, so a config that is not refused fails there instead of taking the machine."""

from __future__ import annotations

from harness import area, refused, subprocess_run, tiny_config, train_command

case = area("config", "config values: sizes, counts, types and keys")


def with_set(tmp, *overrides: str, timeout: float | None = None):
    config = tiny_config(tmp)
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess_run([*train_command(), "--config", str(config), "--run-dir", str(tmp / "run"), *sets], timeout=timeout)


SIZES = {
    "n-layers-100000": ("model.n_layers=100000", "model.n_layers"),
    "d-model-1e6": ("model.d_model=1000000", "model.d_model"),
    "vocab-size-1e9": ("model.vocab_size=1000000000", "model.vocab_size"),
    "max-seq-len-1e9": ("model.max_seq_len=1000000000", "model.max_seq_len"),
    "ffn-dim-1e9": ("model.ffn_dim=1000000000", "model.ffn_dim"),
    "meta-n-tasks-1e6": ("meta.n_tasks=1000000", "meta.n_tasks"),
    "inner-steps-1e9": ("inner_loop.steps=1000000000", "inner_loop.steps"),
    "eval-episodes-1e9": ("eval.episodes=1000000000", "eval.episodes"),
    "batch-size-1e8": ("data.batch_size=100000000", "data.batch_size"),
    "head-hidden-1e9": ("head.hidden_dims=[1000000000]", "head.hidden_dims"),
    "n-way-1e5": ("sampler.n_way=100000", "n_way=100000"),
    "k-shot-1e6": ("sampler.k_shot=1000000", "k_shot + n_query = 1000002"),
}


def _refusal_case(name: str, override: str, key: str) -> None:
    """A case: ``--set override`` must be refused, naming ``key``."""

    @case(name)
    def _(tmp):
        return refused(with_set(tmp, override), key)


for _name, (_override, _key) in SIZES.items():
    _refusal_case(_name, _override, _key)


VALUES = {
    "hybrid-ratio-2": ("hybrid.ratio=2", "hybrid.ratio"),
    "optim-lr-negative": ("optim.lr=-1", "optim.lr"),
    "optim-lr-nan": ("optim.lr=nan", "optim.lr"),
    "inner-lr-1e30": ("inner_loop.lr=1e30", "inner_loop.lr"),
    "n-heads-not-dividing": ("model.n_heads=3", "n_heads"),
    "unknown-key": ("model.n_layerz=2", "n_layerz"),
    "wrong-type": ("model.n_layers=two", "model.n_layers"),
    "window-longer-than-seq": ("sampler.window_len=64", "window_len"),
    "window-len-1": ("sampler.window_len=1", "sampler.window_len"),
    "max-steps-negative": ("trainer.max_steps=-5", "max_steps"),
    "save-every-zero": ("trainer.save_every=0", "save_every"),
    "keep-last-negative": ("checkpoint.keep_last=-1", "keep_last"),
}


for _name, (_override, _key) in VALUES.items():
    _refusal_case(_name, _override, _key)


@case("config-file-missing")
def _(tmp):
    return refused(subprocess_run([*train_command(), "--config", str(tmp / "nope.yaml"), "--run-dir", str(tmp / "run")]), "nope.yaml")


@case("config-file-not-yaml")
def _(tmp):
    (tmp / "bad.yaml").write_text("model: [1, 2\n  x: {")
    return refused(subprocess_run([*train_command(), "--config", str(tmp / "bad.yaml"), "--run-dir", str(tmp / "run")]), "bad.yaml")


@case("config-file-a-list")
def _(tmp):
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    return refused(subprocess_run([*train_command(), "--config", str(tmp / "list.yaml"), "--run-dir", str(tmp / "run")]), "list.yaml")
