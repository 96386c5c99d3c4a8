"""Weighted mixing (shardfmt.mixing): the `0.7 A 0.3 B` syntax and the BlendedSampler schedule.

Every property is checked against a direct count over the stream, not against the schedule's own
bookkeeping: per-batch shares, per-source epochs, random access, rank splits, resume."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfmt import MixSpecError
from shardfmt.mixing import BlendedSampler, parse_mix, source_names
from shardfmt.sampler import RankIterator


# -- syntax ------------------------------------------------------------------------------------
def test_unweighted_paths_and_repeats_are_concatenation():
    assert [(e.path, e.weight) for e in parse_mix(["a", "b", "a"])] == [
        ("a", None), ("b", None), ("a", None)]


def test_weights_are_normalised():
    entries = parse_mix(["7", "data/a", "3", "data/b"])
    assert [e.path for e in entries] == ["data/a", "data/b"]
    assert [e.weight for e in entries] == pytest.approx([0.7, 0.3])
    assert [e.weight for e in parse_mix(["1e-1", "x"])] == [1.0]


@pytest.mark.parametrize("tokens, message", [
    (["0.7", "a", "b"], "ambiguously"),
    (["a", "0.3", "b"], "ambiguously"),
    (["0.7", "a", "0.3"], "ambiguously"),
    (["0.5", "0.5", "a"], "ambiguously"),
    (["0", "a", "1", "b"], "weight 0 for a must be a positive number"),
    (["-1", "a"], "must be a positive"),
    (["nan", "a"], "must be a positive"),
    (["0.5", "a", "0.5", "./a"], "a is given twice with weights"),
])
def test_ambiguous_or_bad_mixes_are_refused(tokens, message):
    with pytest.raises(MixSpecError, match=message):
        parse_mix(tokens, flag="--data_path")


def test_weight_that_is_also_a_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "0.5").mkdir()
    with pytest.raises(MixSpecError, match=r"'0.5' is a weight here, but also an existing path; "
                                           r"write ./0.5"):
        parse_mix(["0.5", "a", "0.5", "b"])
    assert parse_mix(["./0.5"])[0].path == "./0.5"  # a path named like a number, written as one


def test_source_names_are_short_and_unique():
    assert source_names(["data/wiki", "mega/code_text_document", "other/wiki/"]) == [
        "wiki", "code_text_document", "wiki.1"]


# -- the schedule ------------------------------------------------------------------------------
def _stream(s: BlendedSampler, n: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.arange(n)
    return s.source_of(pos), s.indices(pos)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6),
       block=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_every_batch_is_within_one_sample_of_every_weight(weights, block, seed):
    s = BlendedSampler([13] * len(weights), weights, block=block, seed=seed)
    blocks = 300
    src, _ = _stream(s, block * blocks)
    per_batch = np.stack([np.bincount(r, minlength=len(weights))
                          for r in src.reshape(blocks, block)])
    target = np.array(s.weights) * block
    assert (np.abs(per_batch - target) < 1).all()  # floor or ceil of w_k * B, for all k at once
    # over many batches the rounding evens out: no drift (low discrepancy)
    cum = np.cumsum(per_batch, axis=0) - np.outer(np.arange(1, blocks + 1), target)
    assert np.abs(cum).max() < 6, np.abs(cum).max()


def test_cumulative_share_stays_within_a_few_samples_over_long_runs():
    """The measured bound quoted in shardfmt/mixing.py: <= 4 samples over 20,000 batches."""
    worst = 0.0
    for sizes, w, block in [([100, 10, 7], [0.5, 0.3, 0.2], 8), ([5, 3], [0.7, 0.3], 1),
                            ([9, 9, 9], [0.123, 0.456, 0.421], 16)]:
        s = BlendedSampler(sizes, w, block=block, seed=0)
        src = s.source_of(np.arange(block * 20_000))
        cum = np.cumsum(np.eye(len(sizes), dtype=np.int64)[src], axis=0)
        err = cum - np.outer(np.arange(1, src.size + 1), s.weights)
        worst = max(worst, float(np.abs(err).max()))
    assert worst <= 4.1, worst


def test_each_source_is_read_epoch_by_epoch_and_reshuffled():
    sizes = [7, 3, 20]
    s = BlendedSampler(sizes, [0.5, 0.3, 0.2], block=10, seed=5)
    src, idx = _stream(s, 10 * 60)
    starts = np.cumsum([0] + sizes)
    for k, n in enumerate(sizes):
        mine = idx[src == k]
        assert ((mine >= starts[k]) & (mine < starts[k + 1])).all()
        local = mine - starts[k]
        epochs = [local[e * n:(e + 1) * n] for e in range(len(local) // n)]
        assert len(epochs) >= 5
        for order in epochs:  # every epoch of every source is a permutation of it
            assert sorted(order.tolist()) == list(range(n))
        assert len({tuple(o) for o in epochs}) > 1  # reshuffled between epochs
    assert s.samples_seen(600) == np.bincount(src, minlength=3).tolist()
    assert s.samples_seen(123) == np.bincount(src[:123], minlength=3).tolist()
    assert s.epochs_seen(600) == pytest.approx([c / n for c, n in zip(s.samples_seen(600), sizes)])
    unshuffled = BlendedSampler(sizes, [0.5, 0.3, 0.2], block=10, seed=5, shuffle=False)
    src, idx = _stream(unshuffled, 100)
    assert (idx[src == 1] - starts[1]).tolist()[:6] == [0, 1, 2, 0, 1, 2]


def test_random_access_resume_and_ranks_give_the_same_stream():
    s = BlendedSampler([50, 9, 31], [0.2, 0.3, 0.5], block=12, seed=3)
    n = 12 * 3000  # past several checkpoints of the cumulative table (every 1024 blocks)
    src, idx = _stream(s, n)
    fresh = BlendedSampler([50, 9, 31], [0.2, 0.3, 0.5], block=12, seed=3)
    picks = np.random.default_rng(0).integers(0, n, 2000)
    assert (fresh.indices(picks) == idx[picks]).all()  # any order, any position, cold cache
    for world in (1, 2, 3, 4):  # the stream does not depend on how many ranks read it
        start = 12 * 1500 + 5
        got = np.empty(world * 200, dtype=np.int64)
        for rank in range(world):
            it = RankIterator(BlendedSampler([50, 9, 31], [0.2, 0.3, 0.5], block=12, seed=3),
                              start=start, rank=rank, world_size=world, block=64)
            got[rank::world] = [next(it) for _ in range(200)]
        assert (got == idx[start:start + world * 200]).all(), world


def test_state_dict_round_trip_and_mismatches():
    s = BlendedSampler([10, 20], [0.25, 0.75], block=4, seed=1)
    state = s.state_dict(40)
    assert state["samples_seen"] == [10, 30] and state["block"] == 4
    BlendedSampler([10, 20], [1, 3], block=4, seed=1).check_compatible(state)
    for other, what in [(BlendedSampler([10, 21], [1, 3], block=4, seed=1), "sizes"),
                        (BlendedSampler([10, 20], [1, 1], block=4, seed=1), "weights"),
                        (BlendedSampler([10, 20], [1, 3], block=8, seed=1), "block"),
                        (BlendedSampler([10, 20], [1, 3], block=4, seed=2), "seed")]:
        with pytest.raises(ValueError, match=f"{what}: checkpoint"):
            other.check_compatible(state)
    with pytest.raises(ValueError, match="without --data_path weights"):
        s.check_compatible({"seed": 1, "num_samples": 30})
