"""Global RNG capture and restore: a restored process draws exactly what the captured one would have."""

from __future__ import annotations

import io
import random

import numpy as np  # a core dependency of picomaml
import pytest
import torch

from picomaml.train.rng_state import capture_rng_state, restore_rng_state


def draws() -> dict[str, list]:
    """A few draws from every global generator the module covers (gauss uses Python's cached deviate)."""
    return {
        "torch": torch.rand(4).tolist() + torch.randint(0, 1000, (3,)).tolist(),
        "dropout": torch.nn.functional.dropout(torch.ones(16), 0.5).tolist(),
        "python": [random.random(), random.randint(0, 10**9), random.gauss(0.0, 1.0)],
        "numpy": np.random.rand(3).tolist() + [float(np.random.standard_normal())],
    }


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_restore_replays_the_next_draws_of_every_generator():
    seed_all(123)
    draws()  # advance past the seed so a restore-to-seed bug cannot pass
    # one gauss draw each leaves the second deviate of a pair cached: the state must carry it
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    state = capture_rng_state()
    expected = draws()
    seed_all(999)  # move every generator elsewhere
    assert draws() != expected
    restore_rng_state(state)
    assert draws() == expected


@pytest.mark.parametrize("part", ["torch", "python", "numpy"])
def test_each_part_restores_its_own_generator(part):
    seed_all(5)
    state = capture_rng_state()
    expected = draws()[part]
    seed_all(6)
    restore_rng_state({part: state[part]})
    assert draws()[part] == expected


def test_missing_parts_are_left_alone():
    seed_all(7)
    state = capture_rng_state()
    torch_next = torch.rand(3).tolist()
    seed_all(8)
    python_next, numpy_next = [random.random() for _ in range(3)], np.random.rand(3).tolist()
    seed_all(8)
    restore_rng_state({"torch": state["torch"]})  # torch goes back to seed 7, the others stay at seed 8
    assert torch.rand(3).tolist() == torch_next
    assert [random.random() for _ in range(3)] == python_next
    assert np.random.rand(3).tolist() == numpy_next


def test_state_survives_a_weights_only_torch_save_round_trip():
    seed_all(11)
    draws()
    state = capture_rng_state()
    assert set(state) >= {"torch", "python", "numpy"}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # what a checkpoint's rng.pt is loaded with
    expected = draws()
    seed_all(12)
    restore_rng_state(loaded)
    assert draws() == expected


def test_numpy_state_is_tensors_and_plain_numbers():
    state = capture_rng_state()["numpy"]
    assert state["bit_generator"] == "MT19937"
    assert isinstance(state["key"], torch.Tensor) and state["key"].shape == (624,)
    assert isinstance(state["pos"], int) and isinstance(state["gauss"], float)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generators_round_trip_once_initialised():
    torch.cuda.manual_seed_all(21)
    torch.rand(1, device="cuda")  # CUDA is initialised, so the capture includes its generators
    state = capture_rng_state()
    assert "cuda" in state
    expected = torch.rand(5, device="cuda").tolist()
    torch.cuda.manual_seed_all(22)
    restore_rng_state(state)
    assert torch.rand(5, device="cuda").tolist() == expected
