"""Why 4-bit QLoRA resume on CPU was not exact, measured without the trainer (bitsandbytes only).

    .venv/bin/python bench/qlora_cpu_repack.py            # a tiny Llama (~0.2M params) in NF4

bitsandbytes (0.50) Linear4bit.forward repacks its weight for a bf16 CPU inference kernel when
the CPU has AVX512-BF16, the layer is in eval mode and its input needs no gradient. The repack
rounds the NF4 block scales to bf16. Saving (state_dict()) undoes the repack and re-quantises
those rounded scales (double quantisation: a new offset), so after one save the live model's base
weights are not those of a fresh load, and a run resumed from that save diverges.

For each case: train an adapter 2 steps, save it, load a fresh 4-bit base + the adapter, and
compare one more forward/backward of the two models. Prints one JSON line per case:
  eval_mode        the model left in eval mode (from_pretrained's mode; the trainer's bug)
  train_mode       model.train(): no repack while training
  train_then_eval  model.train(), one eval pass (the repack), then the comparison
  train_then_eval_kept  the same with trainer.quantize.keep_training_kernels (the trainer's fix)
Fields: repacked layers, how much one eval pass changed the train-mode logits (max |diff|),
|loss diff|, max |grad diff| of the adapter, the original's nested_offset
change of one repacked layer. Exact (0.0) is the goal.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tiny_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(str(path))


def load_4bit(path: Path, *, keep: bool):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from trainer.quantize import keep_training_kernels, load_kwargs
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, **load_kwargs("4bit", torch.float32, torch.device("cpu")))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if keep:
        keep_training_kernels(model)
    return model


def repacked(model) -> list[str]:
    from bitsandbytes.nn import Linear4bit
    return [n for n, m in model.named_modules() if isinstance(m, Linear4bit)
            and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def case(path: Path, work: Path, *, train_mode: bool, eval_pass: bool, keep: bool) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(0)
    a = get_peft_model(load_4bit(path, keep=keep), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    if train_mode:
        a.train()
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    logit_change = None
    if eval_pass:
        with torch.no_grad():
            before_eval = a(ids).logits
            a.eval()
            a(ids)
            a.train()
            logit_change = float((a(ids).logits - before_eval).abs().max())
    for _ in range(2):
        a(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    packed = repacked(a)
    probe = "base_model.model.model.layers.0.self_attn.q_proj.base_layer"
    before = float(dict(a.named_modules())[probe].weight.quant_state.offset)
    a.save_pretrained(str(work))  # state_dict(): un-repacks, re-quantising the bf16 scales
    after = float(dict(a.named_modules())[probe].weight.quant_state.offset)
    b = PeftModel.from_pretrained(load_4bit(path, keep=keep), str(work), is_trainable=True)
    b.train(train_mode)
    la, lb = a(ids, labels=ids).loss, b(ids, labels=ids).loss
    la.backward()
    lb.backward()
    ga = {k: p.grad for k, p in a.named_parameters() if p.requires_grad}
    gb = {k: p.grad for k, p in b.named_parameters() if p.requires_grad}
    return {"repacked_layers": len(packed), "train_logit_change_by_eval": logit_change,
            "loss_diff": abs(float(la - lb)),
            "grad_diff": max(float((ga[k] - gb[k]).abs().max()) for k in ga),
            "offset_change_by_save": abs(after - before)}


def main() -> int:
    from bitsandbytes.functional import has_avx512bf16
    if not has_avx512bf16():
        print(json.dumps({"skipped": "this CPU has no AVX512-BF16: bitsandbytes never repacks"}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_model(root / "llama")
        cases = {"eval_mode": dict(train_mode=False, eval_pass=False, keep=False),
                 "train_mode": dict(train_mode=True, eval_pass=False, keep=False),
                 "train_then_eval": dict(train_mode=True, eval_pass=True, keep=False),
                 "train_then_eval_kept": dict(train_mode=True, eval_pass=True, keep=True)}
        for name, kw in cases.items():
            result = case(root / "llama", root / name, **kw)
            print(json.dumps({"case": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
