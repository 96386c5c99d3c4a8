"""Per-source losses (weighted mixing): the loss of each data source inside a micro-batch, from the
same forward as the training loss, equals each source's samples run on their own; the training
loss itself is unchanged to the bit."""

import numpy as np
import pytest
import torch

from shardfmt import Sample
from trainer.data import collate, model_inputs
from trainer.loss import forward_loss_sum, token_loss_sum

from trainer_testlib import build_model

VOCAB = 97


def _samples():
    rng = np.random.default_rng(3)
    out = []
    for n, docs in [(9, [4, 5]), (12, [12]), (6, [6]), (10, [3, 7])]:
        mask = rng.random(n) > 0.2
        out.append(Sample(rng.integers(4, VOCAB, n).astype(np.uint16), mask,
                          np.array(docs, np.int32)))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    path = tmp_path_factory.mktemp("m")
    build_model(path, vocab_size=VOCAB, seed=2)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("flatten", [False, True])
def test_per_source_sums_equal_each_source_alone(model, fused, flatten):
    samples, sources = _samples(), [1, 0, 2, 1]
    cpu = torch.device("cpu")
    impl = "sdpa"  # block-diagonal 4-D mask from segment ids: flattened rows stay separate
    batch = collate(samples, pad_id=3, flatten=flatten, sources=sources)
    plain = collate(samples, pad_id=3, flatten=flatten)
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        loss = forward_loss_sum(model, model_inputs(batch, impl, torch.float32, cpu),
                                batch["labels"], fused=fused, token_groups=batch["source_ids"],
                                group_sums=sums)
        same = forward_loss_sum(model, model_inputs(plain, impl, torch.float32, cpu),
                                plain["labels"], fused=fused)
        alone = [float(token_loss_sum(model(**model_inputs(one, "sdpa", torch.float32, cpu)).logits,
                                      one["labels"]))
                 for one in (collate([s]) for s in samples)]
    assert float(loss) == float(same)  # the training loss does not change
    want = np.zeros(3)
    for k, value in zip(sources, alone):
        want[k] += value
    assert np.allclose(sums.numpy(), want, rtol=1e-5, atol=1e-5), (sums, want)
    assert batch["source_samples"] == sources
    assert set(batch["source_ids"].unique().tolist()) <= {-1, 0, 1, 2}


def test_empty_megatron_sequence_collates_to_nothing_trained():
    """megatron-core writes empty sequences; each is one sample here, with no tokens to train."""
    empty = Sample(np.zeros(0, np.uint16), np.zeros(0, bool), np.array([0], np.int32))
    full = Sample(np.array([5, 6, 7], np.uint16), np.ones(3, bool), np.array([3], np.int32))
    for flatten in (False, True):
        b = collate([empty, full], pad_id=3, flatten=flatten, sources=[0, 1])
        assert (b["labels"] != -100).sum() == 2 and b["num_tokens"] == 3
        assert b["source_samples"] == [0, 1]
