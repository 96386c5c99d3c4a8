"""The fused head (--fused_loss) gives the loss and gradients of the full-logits path: the bare
function against F.cross_entropy, then whole models (tied Llama, untied Qwen2; packed and padded
micro-batches), and the rule for which models may use it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shardfmt import Sample
from trainer.data import collate, model_inputs
from trainer.loss import (forward_loss_sum, fused_head_problem, linear_cross_entropy_sum,
                          token_loss_sum)

from trainer_testlib import build_model

VOCAB = 97


def _reference(h, w, t):
    return F.cross_entropy(h @ w.t(), t, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 100])
def test_matches_cross_entropy_loss_and_grads(chunk_rows):
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(37, 16, generator=g), torch.randn(53, 16, generator=g)
    t = torch.randint(0, 53, (37,), generator=g)
    h_ref, w_ref = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    (_reference(h_ref, w_ref, t) * 0.37).backward()
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, w, t, chunk_rows=chunk_rows)
    (loss * 0.37).backward()  # a non-unit upstream gradient, as the trainer's 1/count scale
    assert torch.allclose(loss, _reference(h0, w0, t), rtol=1e-6, atol=1e-5)
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-6)
    assert torch.allclose(w.grad, w_ref.grad, atol=1e-6)


def test_frozen_weight_and_no_grad():
    g = torch.Generator().manual_seed(1)
    h0, w = torch.randn(9, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (9,), generator=g)
    h = h0.clone().requires_grad_()
    linear_cross_entropy_sum(h, w, t, chunk_rows=4).backward()  # LoRA: the head is frozen
    h_ref = h0.clone().requires_grad_()
    _reference(h_ref, w, t).backward()
    assert w.grad is None and torch.allclose(h.grad, h_ref.grad, atol=1e-6)
    with torch.no_grad():  # eval
        loss = linear_cross_entropy_sum(h0, w, t, chunk_rows=4)
    assert not loss.requires_grad and torch.allclose(loss, _reference(h0, w, t), atol=1e-5)


def test_bf16_inputs_stay_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g) * 0.1
    t = torch.randint(0, 300, (64,), generator=g)
    loss = linear_cross_entropy_sum(h.bfloat16(), w.bfloat16(), t, chunk_rows=16)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(_reference(h, w, t))) <= 1e-2 * float(_reference(h, w, t))


def _batches():
    rng = np.random.default_rng(7)
    lens = [7, 12, 5, 9]
    docs = [rng.integers(4, VOCAB, n).astype(np.uint16) for n in lens]
    masks = [rng.random(n) > 0.3 for n in lens]
    samples = [Sample(d, m, np.array([len(d)], np.int32)) for d, m in zip(docs, masks)]
    packed = Sample(np.concatenate(docs[:3]), np.concatenate(masks[:3]),
                    np.array(lens[:3], dtype=np.int32))
    return [collate([packed]), collate(samples[1:], pad_id=3)]


def _loss_and_grads(model, batches, fused):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        loss = forward_loss_sum(model, model_inputs(b, "sdpa", torch.float32, torch.device("cpu")),
                                b["labels"], fused=fused)
        (loss * 0.1).backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,tie", [("llama", True), ("qwen2", False)])
def test_model_loss_and_grads_equal_full_logits(tmp_path, kind, tie):
    from transformers import AutoModelForCausalLM
    build_model(tmp_path, vocab_size=VOCAB, kind=kind, tie=tie, seed=5)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    assert fused_head_problem(model) is None
    loss_f, grads_f = _loss_and_grads(model, _batches(), fused=True)
    loss_l, grads_l = _loss_and_grads(model, _batches(), fused=False)
    assert grads_f.keys() == grads_l.keys() and len(grads_f) > 0
    assert abs(loss_f - loss_l) <= 1e-5 * abs(loss_l)
    for name in grads_l:
        assert torch.allclose(grads_f[name], grads_l[name], atol=1e-6), name
    with torch.no_grad():  # eval path, and the logits path's own result for the same batch
        b = _batches()[1]
        inputs = model_inputs(b, "sdpa", torch.float32, torch.device("cpu"))
        fused = forward_loss_sum(model, inputs, b["labels"], fused=True)
        full = token_loss_sum(model(**inputs).logits, b["labels"])
    assert abs(float(fused) - float(full)) <= 1e-5 * float(full)


def test_which_models_may_use_it(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, BloomConfig, BloomForCausalLM, Gemma2Config,
                              Gemma2ForCausalLM)
    build_model(tmp_path, vocab_size=VOCAB, seed=5)
    load = lambda: AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)  # noqa: E731
    lora_body = get_peft_model(load(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert fused_head_problem(lora_body) is None  # the default LoRA targets leave lm_head plain
    lora_head = get_peft_model(load(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "not a bias-free torch.nn.Linear" in fused_head_problem(lora_head)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2))
    assert "model_type 'bloom'" in fused_head_problem(bloom)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=8, pad_token_id=0))
    assert "final_logit_softcapping=30.0" in fused_head_problem(gemma2)
    assert "ZeRO-3" in fused_head_problem(load(), zero3=True)
