"""Collate: labels, position ids, segment ids, 4D masks, flattening, eval sharding."""

import numpy as np
import torch

from shardfmt import Sample
from trainer.data import attention_mask_4d, collate, count_loss_tokens, eval_shard


def sample(ids, mask, doc_lens):
    return Sample(np.asarray(ids, dtype=np.uint16), np.asarray(mask, dtype=bool),
                  np.asarray(doc_lens, dtype=np.int32))


def test_labels_positions_segments_of_packed_sample():
    s = sample([10, 11, 12, 20, 21, 22, 23], [0, 1, 1, 1, 1, 0, 1], [3, 4])
    b = collate([s])
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22, 23]]
    # first token of each doc never a target; non-loss tokens -100
    assert b["labels"].tolist() == [[-100, 11, 12, -100, 21, -100, 23]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    assert count_loss_tokens(b) == 4
    assert b["num_tokens"] == 7


def test_pads_to_longest_with_ignored_labels():
    a = sample([5, 6, 7, 8, 9], [1] * 5, [5])
    b = sample([1, 2], [1, 1], [2])
    out = collate([a, b], pad_id=3)
    assert out["input_ids"].shape == (2, 5)
    assert out["input_ids"][1].tolist() == [1, 2, 3, 3, 3]
    assert out["labels"][1].tolist() == [-100, 2, -100, -100, -100]
    assert out["segment_ids"][1].tolist() == [0, 0, -1, -1, -1]
    assert out["num_tokens"] == 7


def test_uint16_ids_above_int16_survive():
    out = collate([sample([65000, 40000], [1, 1], [2])])
    assert out["input_ids"].tolist() == [[65000, 40000]] and out["input_ids"].dtype == torch.int64


def test_block_diagonal_causal_mask_bool_and_float():
    b = collate([sample([1, 2, 3, 4, 5], [1] * 5, [2, 3])], pad_id=0)
    m = attention_mask_4d(b["segment_ids"], "sdpa", torch.float32)
    assert m.dtype == torch.bool and m.shape == (1, 1, 5, 5)
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], expected)
    f = attention_mask_4d(b["segment_ids"], "eager", torch.float32)
    assert f.dtype == torch.float32
    assert torch.equal(f[0, 0] == 0, expected)
    assert (f[0, 0][~expected] == torch.finfo(torch.float32).min).all()


def test_pad_rows_attend_to_something():
    """A pad query row must not be all-False (SDPA would return NaN and poison gradients)."""
    b = collate([sample([1, 2, 3], [1] * 3, [3]), sample([4], [1], [1])])
    m = attention_mask_4d(b["segment_ids"], "sdpa", torch.float32)
    assert m.any(dim=-1).all()


def test_flatten_for_flash_attention():
    out = collate([sample([1, 2, 3], [1] * 3, [3]), sample([4, 5], [1, 1], [2])], flatten=True)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert out["segment_ids"].tolist() == [[0, 0, 0, 1, 1]]


def test_eval_shard_equal_batches_and_weights():
    shards = [eval_shard(5, r, 2, 2) for r in range(2)]
    assert all(len(s.indices) == 4 for s in shards)  # ceil(5/2)=3 -> padded to 4 for micro 2
    real = sorted(int(i) for s in shards for i, w in zip(s.indices, s.weights) if w > 0)
    assert real == [0, 1, 2, 3, 4]
