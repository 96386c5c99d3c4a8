"""QLoRA (--quantization 4bit|8bit) and bitsandbytes' 8-bit optimizers, on CPU (bitsandbytes
>= 0.45 runs NF4 and LLM.int8 on CPU): train, exact resume from an adapter checkpoint, export
merged into the unquantised base with the logit difference reported, ZeRO-2 data parallel, and
the ZeRO-3 refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from trainer_testlib import (REPO, base_args, build_model, build_tokenizer, losses, only_run_dir,
                             run_chains, run_env, run_train, write_dataset)

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qassets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    tok = build_tokenizer(root / "llama")
    build_model(root / "llama", vocab_size=len(tok))
    train = write_dataset(root / "data", "train", tok, num_samples=48, seed=1)
    evaluation = write_dataset(root / "data", "eval", tok, num_samples=4, seed=2)
    return {"root": root, "llama": root / "llama", "train": train, "eval": evaluation}


def _run(argv):
    from trainer_testlib import train_in_process
    return train_in_process(argv)


def _adapter(ckpt):
    from safetensors.torch import load_file
    return load_file(str(ckpt / "adapter_model.safetensors"))


@pytest.mark.parametrize("quant,optimizer", [("4bit", "adamw8bit"), ("8bit", "paged_adamw8bit")])
def test_qlora_trains_resumes_exactly_and_exports(qassets, tmp_path, quant, optimizer, capsys):
    from transformers import AutoModelForCausalLM

    from trainer.export import REPORT, main as export_main
    # an eval before the step-2 save: on CPU it used to repack the 4-bit weights (trainer/quantize.py)
    common = ["--use_lora", "--quantization", quant, "--optimizer", optimizer,
              "--learning_rate", "1e-2", "--num_workers", "0", "--logging_steps", "1",
              "--micro_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--eval_data_path", str(qassets["eval"]), "--eval_steps", "1"]
    trainer, state = _run(base_args(qassets, tmp_path / "a", "--max_steps", "4", "--save_steps", "2",
                                    "--save_optimizer", "--no_timestamp", *common))
    model = trainer.engine.module
    assert model.training  # from_pretrained's eval mode is not what the loop trains in
    base_layers = [m.base_layer for m in model.modules() if hasattr(m, "base_layer")]
    assert base_layers and {m.__class__.__name__ for m in base_layers} \
        == {"Linear4bit" if quant == "4bit" else "Linear8bitLt"}
    # 4 evals ran; no 4-bit weight went to bitsandbytes' CPU inference layout (bf16 scales)
    assert not any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                   for m in base_layers)
    full = [h["loss"] for h in state.loss_history]
    assert full[-1] < full[0]
    run_a = tmp_path / "a" / "run"
    step2, step4 = run_a / "checkpoints" / "step_2", run_a / "checkpoints" / "step_4"
    assert (step4 / "adapter_model.safetensors").is_file()
    assert not (step4 / "model.safetensors").exists()  # adapters only
    resolved = json.loads((step4 / "resolved_config.json").read_text())
    assert resolved["quantization"] == quant

    _, resumed = _run(base_args(qassets, tmp_path / "b", "--max_steps", "4", "--no_timestamp",
                                "--load_ckpt_path", str(step2), *common))
    again = [h["loss"] for h in resumed.loss_history]
    # the trainer's resume standard (tests/trainer/test_e2e.py): <= 1e-6 (fp32 rounding)
    assert max(abs(x - y) for x, y in zip(again, full)) <= 1e-6, (full, again)
    a, b = _adapter(step4), _adapter(tmp_path / "b" / "run" / "checkpoints" / "step_4")
    assert a.keys() == b.keys()
    # <= 1e-6 for both (4-bit was ~3e-5 before trainer/quantize.keep_training_kernels)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [e["eval_loss"] for e in resumed.eval_history] == pytest.approx(
        [e["eval_loss"] for e in state.eval_history], abs=1e-6)

    out = tmp_path / "merged"
    assert export_main(["--checkpoint", str(run_a), "--output", str(out),
                        "--base", str(qassets["llama"])]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / REPORT).read_text())
    diff = report["max_logit_diff_merged_vs_quantized"]
    assert f"{diff:.4g}" in printed and report["quantization"] == quant
    assert 0.0 < diff < 1.0  # the quantisation error of a tiny model: present, and small
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.model.layers[0].self_attn.q_proj.__class__ is torch.nn.Linear
    # independent: the unquantised base + the adapter, merged by peft here
    from peft import PeftModel
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        qassets["llama"], dtype=torch.float32), step4).merge_and_unload()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-6)


def test_lion8bit_trains_a_full_model(qassets, tmp_path):
    _, state = _run(base_args(qassets, tmp_path, "--max_steps", "4", "--optimizer", "lion8bit",
                              "--learning_rate", "3e-3", "--num_workers", "0", "--no_timestamp",
                              "--micro_batch_size", "4"))
    history = [h["loss"] for h in state.loss_history]
    assert history[-1] < history[0]


def test_quantization_needs_lora_and_refuses_zero3(qassets, tmp_path):
    from trainer.args import parse_args, validate_args
    problems = validate_args(parse_args(base_args(qassets, tmp_path, "--quantization", "4bit",
                                                  "--zero_stage", "3")))
    text = "\n".join(problems)
    assert "--quantization 4bit: quantised weights cannot be trained directly; add --use_lora" in text
    assert "--zero_stage 3: ZeRO-3 partitions every parameter" in text and "--zero_stage 2" in text


def test_zero3_json_with_quantization_is_refused_before_loading(qassets, tmp_path):
    ds = tmp_path / "ds3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu":
                              "auto", "gradient_accumulation_steps": "auto"}))
    proc = run_train(base_args(qassets, tmp_path, "--use_lora", "--quantization", "4bit",
                               "--deepspeed_config_path", str(ds)), check=False)
    assert proc.returncode == 2
    assert "ZeRO-3 partitions every parameter" in proc.stderr


@pytest.mark.slow
def test_qlora_zero2_two_ranks_equals_one_process(qassets, tmp_path):
    """2 ranks x micro-batch 1 == 1 process x 2 accumulation steps (the same global batch).
    LoRA dropout off: 2 ranks draw their dropout masks from one seed, 1 process draws two."""
    lora = tmp_path / "lora.json"
    lora.write_text(json.dumps({"lora_dropout": 0.0}))
    common = ["--use_lora", "--lora_config_path", str(lora), "--quantization", "4bit",
              "--learning_rate", "1e-2",
              "--num_workers", "0", "--max_steps", "3", "--zero_stage", "2"]
    run_chains([  # side by side: the start-up of one overlaps the other's steps
        [("dp", "torchrun", 2, lambda: base_args(qassets, tmp_path / "dp", "--micro_batch_size",
                                                 "1", *common))],
        [("one", "python", 1, lambda: base_args(qassets, tmp_path / "one", "--micro_batch_size",
                                                "1", "--gradient_accumulation_steps", "2",
                                                *common))],
    ], timeout=900)
    dp = losses(only_run_dir(tmp_path / "dp") / "checkpoints" / "step_3")
    one = losses(only_run_dir(tmp_path / "one") / "checkpoints" / "step_3")
    assert max(abs(x - y) for x, y in zip(dp, one)) <= 1e-5, (dp, one)
