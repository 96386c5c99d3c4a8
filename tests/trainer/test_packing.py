"""Packing equivalence: loss and gradients of a packed sample equal those of its documents run
separately (fp32, <= 1e-5), for sdpa and eager; and the mask is what makes it so."""

import numpy as np
import pytest
import torch

from shardfmt import Sample
from trainer.data import collate, model_inputs
from trainer.loss import token_loss_sum

from trainer_testlib import build_model

VOCAB = 97


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack_model")
    build_model(d, vocab_size=VOCAB, seed=3)
    return d


def _load(model_dir, impl):
    from transformers import AutoModelForCausalLM

    from trainer.attention import register_varlen_sdpa
    register_varlen_sdpa()  # what trainer.model.load_training_model does for sdpa_varlen
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation=impl)


def _docs():
    rng = np.random.default_rng(7)
    lens = [7, 12, 5]
    docs = [rng.integers(4, VOCAB, n).astype(np.uint16) for n in lens]
    masks = [rng.random(n) > 0.3 for n in lens]
    return docs, masks


def _loss_and_grads(model, batches, impl):
    model.zero_grad()
    total = 0.0
    for b in batches:
        out = model(**model_inputs(b, impl, torch.float32, torch.device("cpu")))
        loss = token_loss_sum(out.logits, b["labels"])
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def _max_grad_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "sdpa_varlen"])
def test_packed_equals_separate(model_dir, impl):
    model = _load(model_dir, impl)
    docs, masks = _docs()
    packed = Sample(np.concatenate(docs), np.concatenate(masks),
                    np.array([len(d) for d in docs], dtype=np.int32))
    separate = [collate([Sample(d, m, np.array([len(d)], np.int32))]) for d, m in zip(docs, masks)]
    loss_p, grads_p = _loss_and_grads(model, [collate([packed])], impl)
    loss_s, grads_s = _loss_and_grads(model, separate, impl)
    assert abs(loss_p - loss_s) <= 1e-5
    assert _max_grad_diff(grads_p, grads_s) <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_batch_equals_separate(model_dir, impl):
    model = _load(model_dir, impl)
    docs, masks = _docs()
    samples = [Sample(d, m, np.array([len(d)], np.int32)) for d, m in zip(docs, masks)]
    loss_b, grads_b = _loss_and_grads(model, [collate(samples, pad_id=3)], impl)
    loss_s, grads_s = _loss_and_grads(model, [collate([s]) for s in samples], impl)
    assert abs(loss_b - loss_s) <= 1e-5
    assert _max_grad_diff(grads_b, grads_s) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_flattened_varlen_batch_equals_separate(tmp_path, kind):
    """sdpa_varlen on a flattened micro-batch (2 packed rows -> 1 row, per-document SDPA) equals
    every document run alone, for GQA Llama and Qwen2 (q/k/v biases)."""
    from trainer_testlib import build_model
    build_model(tmp_path, vocab_size=VOCAB, kind=kind, seed=4)
    model = _load(tmp_path, "sdpa_varlen")
    docs, masks = _docs()
    rows = [Sample(np.concatenate(docs[:2]), np.concatenate(masks[:2]),
                   np.array([len(docs[0]), len(docs[1])], dtype=np.int32)),
            Sample(docs[2], masks[2], np.array([len(docs[2])], dtype=np.int32))]
    flat = collate(rows, pad_id=3, flatten=True)
    assert flat["input_ids"].shape == (1, sum(len(d) for d in docs))
    loss_f, grads_f = _loss_and_grads(model, [flat], "sdpa_varlen")
    separate = [collate([Sample(d, m, np.array([len(d)], np.int32))]) for d, m in zip(docs, masks)]
    loss_s, grads_s = _loss_and_grads(model, separate, "sdpa")
    assert abs(loss_f - loss_s) <= 1e-5
    assert _max_grad_diff(grads_f, grads_s) <= 1e-5


def test_position_ids_alone_leak_across_documents(model_dir):
    """Control: without the block-diagonal mask the packed loss differs (the test can fail)."""
    model = _load(model_dir, "sdpa")
    docs, masks = _docs()
    packed = collate([Sample(np.concatenate(docs), np.concatenate(masks),
                             np.array([len(d) for d in docs], dtype=np.int32))])
    with torch.no_grad():
        masked = token_loss_sum(model(**model_inputs(packed, "sdpa", torch.float32,
                                                     torch.device("cpu"))).logits, packed["labels"])
        leaky = token_loss_sum(model(input_ids=packed["input_ids"],
                                     position_ids=packed["position_ids"]).logits, packed["labels"])
    assert abs(float(masked) - float(leaky)) > 1e-4


def test_auto_attention_picks_varlen_only_where_checked():
    from trainer.model import resolve_attn_implementation
    assert resolve_attn_implementation("auto", "llama") == "sdpa_varlen"  # no GPU here
    assert resolve_attn_implementation("auto", "falcon") == "sdpa"
    assert resolve_attn_implementation("sdpa", "falcon") == "sdpa"
    with pytest.raises(ValueError, match="sdpa_varlen: not checked for model_type 'falcon'"):
        resolve_attn_implementation("sdpa_varlen", "falcon")
