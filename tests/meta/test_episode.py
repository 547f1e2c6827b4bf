"""Episode: shape properties, stacking, indexing, device moves and invariant checks."""

from __future__ import annotations

import pytest
import torch

from picomaml.meta.episode import Episode, EpisodeError

MASK = 99


def toy_episode(n: int = 3, k: int = 2, q: int = 1, w: int = 5, offset: int = 0) -> Episode:
    """A hand-built valid episode: class token of label l is 10 + l + offset, masked at position l % w."""
    classes = torch.arange(n) + 10 + offset

    def part(per: int, first_window: int) -> tuple[torch.Tensor, ...]:
        labels = torch.arange(n).repeat_interleave(per)
        ids = torch.full((n * per, w), 1, dtype=torch.long)
        mask = torch.zeros(n * per, w, dtype=torch.bool)
        mask[torch.arange(n * per), labels % w] = True
        ids[mask] = MASK
        windows = torch.arange(n * per) + first_window
        return ids, labels, mask, windows

    s_ids, s_lab, s_mask, s_win = part(k, 0)
    q_ids, q_lab, q_mask, q_win = part(q, n * k)
    return Episode(s_ids, s_lab, s_mask, q_ids, q_lab, q_mask, classes, s_win, q_win, windows_per_row=4)


def test_properties_single_task():
    ep = toy_episode(n=3, k=2, q=1, w=5)
    assert (ep.n_way, ep.k_shot, ep.n_query, ep.window_len, ep.n_tasks) == (3, 2, 1, 5, None)
    assert ep.validate(MASK) is ep
    assert "n_way=3" in repr(ep)
    assert list(ep.tasks()) == [ep]


def test_stack_task_roundtrip():
    eps = [toy_episode(offset=i) for i in range(4)]
    st = Episode.stack(eps)
    assert st.n_tasks == 4
    assert st.support_ids.shape == (4, 6, 5) and st.query_labels.shape == (4, 3)
    assert st.class_token_ids.shape == (4, 3)
    assert (st.n_way, st.k_shot, st.n_query, st.window_len) == (3, 2, 1, 5)
    st.validate(MASK)
    for i, ep in enumerate(eps):
        got = st.task(i)
        assert got.n_tasks is None
        for name in ("support_ids", "support_labels", "query_mask", "class_token_ids", "support_windows"):
            assert torch.equal(getattr(got, name), getattr(ep, name))
    assert torch.equal(st.task(-1).class_token_ids, eps[-1].class_token_ids)
    assert len(list(st.tasks())) == 4
    assert Episode.stack([eps[0]]).n_tasks == 1


def test_stack_drops_missing_provenance():
    a, b = toy_episode(), toy_episode()
    b.support_windows = None
    b.windows_per_row = 7
    st = Episode.stack([a, b])
    assert st.support_windows is None and st.query_windows is not None and st.windows_per_row is None


def test_to_device_keeps_dtypes():
    ep = toy_episode().to("cpu")
    assert ep.support_ids.dtype == torch.long and ep.support_mask.dtype == torch.bool
    assert ep.device.type == "cpu"


def test_stack_errors():
    with pytest.raises(EpisodeError, match="empty"):
        Episode.stack([])
    with pytest.raises(EpisodeError, match="share N, K, Q and W"):
        Episode.stack([toy_episode(k=2), toy_episode(k=3)])
    st = Episode.stack([toy_episode(), toy_episode()])
    with pytest.raises(EpisodeError, match="already stacked"):
        Episode.stack([st])
    with pytest.raises(EpisodeError, match="not stacked"):
        toy_episode().task(0)
    with pytest.raises(EpisodeError, match="out of range"):
        st.task(2)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda ep: ep.support_labels.__setitem__(0, 3), r"values must lie in \[0, 3\)"),
        (lambda ep: ep.support_labels.__setitem__(0, 1), "exactly 2 rows"),
        (lambda ep: setattr(ep, "support_mask", ep.support_mask[:, :4]), "support_mask: shape"),
        (lambda ep: setattr(ep, "query_ids", ep.query_ids.float()), "dtype torch.long"),
        (lambda ep: setattr(ep, "query_mask", ep.query_mask.long()), "dtype torch.bool"),
        (lambda ep: setattr(ep, "query_ids", ep.query_ids[:, :4]), "window length"),
        (lambda ep: setattr(ep, "support_ids", ep.support_ids[:5]), "support_ids: expected shape"),
        (lambda ep: ep.support_ids.__setitem__((0, 4), 10), "survives unmasked"),
        (lambda ep: ep.class_token_ids.__setitem__(1, 10), "repeats a class token"),
        (lambda ep: ep.query_windows.__setitem__(0, 0), "uses a window twice"),
        (lambda ep: ep.query_mask.__setitem__(0, False), "no masked position"),
    ],
)
def test_validate_names_the_broken_invariant(corrupt, match):
    ep = toy_episode()
    corrupt(ep)
    with pytest.raises(EpisodeError, match=match):
        ep.validate()


def test_validate_checks_mask_token():
    ep = toy_episode()
    ep.validate()  # without the mask id, the value at masked positions is not checked
    with pytest.raises(EpisodeError, match="mask_token_id=5"):
        ep.validate(mask_token_id=5)


def test_validate_stacked_catches_one_bad_task():
    st = Episode.stack([toy_episode(), toy_episode()])
    st.query_labels[1, 0] = 2
    with pytest.raises(EpisodeError, match="exactly 1 rows"):
        st.validate()


def test_origins_map_windows_to_rows_and_offsets():
    ep = toy_episode(n=3, k=2, q=1, w=5)  # windows 0..5 support, 6..8 query, 4 windows per row
    rows, starts = ep.origins("support")
    assert rows.tolist() == [0, 0, 0, 0, 1, 1] and starts.tolist() == [0, 5, 10, 15, 0, 5]
    rows, starts = ep.origins("query")
    assert rows.tolist() == [1, 1, 2] and starts.tolist() == [10, 15, 0]
    with pytest.raises(ValueError, match="part"):
        ep.origins("train")
    ep.windows_per_row = None
    with pytest.raises(EpisodeError, match="no provenance"):
        ep.origins()


def test_fields_shared_with_text_episodes():
    from picomaml.meta.episode import COMMON_FIELDS

    for ep in (toy_episode(), Episode.stack([toy_episode(), toy_episode(offset=5)])):
        assert all(hasattr(ep, name) for name in COMMON_FIELDS)
        # an SMLMT window has no padding: every position is a real token
        for part in ("support", "query"):
            valid = getattr(ep, f"{part}_valid")
            assert valid.dtype == torch.bool and valid.shape == getattr(ep, f"{part}_ids").shape
            assert bool(valid.all())
        assert ep.class_ids is ep.class_token_ids
        assert ep.padded is False


def test_validate_refuses_a_mask_id_that_is_a_real_token_of_the_windows():
    ep = toy_episode()
    ep.validate(MASK)
    ep.query_ids[1, 4] = MASK  # an unmasked position holding the mask id: the data has that token
    with pytest.raises(EpisodeError, match=f"^mask_token_id: {MASK} occurs at 1 unmasked positions of query_ids"):
        ep.validate(MASK)
    ep.validate()  # without a mask id there is nothing to compare
    stacked = Episode.stack([toy_episode(offset=i) for i in range(2)])
    stacked.support_ids[1, 0, 3] = MASK
    with pytest.raises(EpisodeError, match="occurs at 1 unmasked positions of support_ids"):
        stacked.validate(MASK)
