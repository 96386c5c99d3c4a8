"""End-to-end runs of trainer/train.py on CPU (gloo): deepspeed 2 ranks ZeRO-2/ZeRO-3, torchrun as two
nodes on loopback and as 2 ranks on one node (the resume), plain python; checkpoints, resume
equivalence, accumulation equivalence, LoRA with added tokens, and bad inputs failing before step 1.

The learnable task: documents count upwards (w_s, w_s+1, ...), so the loss falls within a few steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from trainer_testlib import (COMMON, REPO, STEPS, VENV_BIN, base_args, build_tokenizer,
                             check_ok, free_port, losses, only_run_dir, run_env, run_train,
                             run_trains, write_dataset)

pytestmark = pytest.mark.slow

# STEPS, COMMON and base_args() live in trainer_testlib.py; the 2-rank ZeRO-2 run `zero2_run` (the
# reference the resume, accumulation and multi-node runs are compared with) in conftest.py.


def load_weights(ckpt: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file
    return load_file(str(ckpt / name))


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------- ZeRO-2
def test_zero2_two_ranks_loss_falls_and_checkpoints(zero2_run):
    ckpts = zero2_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS}"
    final = ckpts / f"step_{STEPS}"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["global_batch"] == 4
    assert state["consumed_samples"] == 4 * STEPS and state["sampler"]["consumed_samples"] == 32
    assert state["args"]["micro_batch_size"] == 1
    curve = [h["loss"] for h in state["loss_history"]]
    assert len(curve) == STEPS and np.mean(curve[-2:]) < np.mean(curve[:2]) - 0.3, curve
    assert [e["step"] for e in state["eval_history"]] == [4, 8]
    assert state["eval_history"][1]["eval_loss"] < state["eval_history"][0]["eval_loss"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "resolved_config.json",
                 "loss_curve.png", "rng/rank_0.json", "rng/rank_1.json", "deepspeed/ds"):
        assert (final / name).exists(), name
    resolved = json.loads((final / "resolved_config.json").read_text())
    assert resolved["deepspeed_config"]["train_batch_size"] == 4
    log = [json.loads(l) for l in (zero2_run / "train_log.jsonl").read_text().splitlines()]
    train_lines = [r for r in log if "loss" in r]
    assert len(train_lines) == STEPS
    assert {"lr", "grad_norm", "tokens_per_sec_per_device", "loss_tokens_per_device",
            "samples_seen"} <= train_lines[0].keys()
    assert list((zero2_run / "tensorboard").iterdir())
    assert not list(ckpts.glob(".tmp_*"))


def test_zero2_checkpoint_loads_with_from_pretrained(zero2_run, assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = zero2_run / "checkpoints" / f"step_{STEPS}"
    tok = AutoTokenizer.from_pretrained(str(final))
    ids = torch.tensor([tok.convert_tokens_to_ids([f"w{i}" for i in range(10, 30)])])
    with torch.no_grad():
        trained, base = (float(AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)(
            input_ids=ids, labels=ids).loss) for p in (final, assets["llama"]))
    assert trained < base - 0.3, (trained, base)


# ------------------------------------------------------------------------------------- resume
def test_resume_equivalence_two_ranks(zero2_run, assets, tmp_path):
    """Steps 5..8 after resuming from step_4 (new processes) equal the uninterrupted run's.

    The resumed run is launched by `torchrun --nproc_per_node 2` (the uninterrupted one by the
    deepspeed launcher): the result must not depend on the launcher, and torchrun starts the ranks
    ~9 s sooner. A 2-rank resume under the deepspeed launcher is
    tests/reliability/test_trainer_killed.py::test_killed_mid_save_two_ranks."""
    straight = zero2_run / "checkpoints" / f"step_{STEPS}"
    run_train(base_args(assets, tmp_path, "--micro_batch_size", "1", "--gradient_accumulation_steps",
                        "2", "--zero_stage", "2", "--eval_data_path", str(assets["eval"]),
                        "--eval_steps", "4", "--load_ckpt_path", str(zero2_run / "checkpoints" /
                                                                      "step_4")),
              launcher="torchrun", nproc=2)
    resumed = only_run_dir(tmp_path) / "checkpoints" / f"step_{STEPS}"
    a, b = losses(straight), losses(resumed)
    assert len(b) == STEPS  # history carried over
    assert np.max(np.abs(np.array(a) - np.array(b))) <= 1e-6, (a, b)
    assert max_weight_diff(load_weights(straight), load_weights(resumed)) <= 1e-6
    sa = json.loads((resumed / "trainer_state.json").read_text())
    assert sa["consumed_samples"] == 32 and sa["eval_history"][-1]["eval_loss"] == pytest.approx(
        json.loads((straight / "trainer_state.json").read_text())["eval_history"][-1]["eval_loss"],
        abs=1e-6)


def test_resume_with_other_world_size(zero2_run, assets, tmp_path):
    """ZeRO optimizer shards of 2 ranks cannot load on 1: refused before step 1 with the ways out.
    Weights-only (the engine checkpoint moved away): works on 1 rank, warns loudly, and continues
    the LR schedule and the data position instead of restarting them. (The two 1-process runs
    are independent: they run side by side.)"""
    weights_only = tmp_path / "step_4"
    shutil.copytree(zero2_run / "checkpoints" / "step_4", weights_only,
                    ignore=shutil.ignore_patterns("deepspeed"))
    refused, proc = run_trains([
        base_args(assets, tmp_path / "a", "--micro_batch_size", "2", "--gradient_accumulation_steps",
                  "2", "--load_ckpt_path", str(zero2_run)),
        base_args(assets, tmp_path / "b", "--micro_batch_size", "2", "--gradient_accumulation_steps",
                  "2", "--load_ckpt_path", str(weights_only))])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "saved by 2 ranks" in refused.stderr and "ds_to_universal" in refused.stderr
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").rglob("train_log.jsonl"))
    check_ok(proc)
    assert "RESUMING WITHOUT OPTIMIZER STATE" in proc.stderr
    final = only_run_dir(tmp_path / "b") / "checkpoints" / f"step_{STEPS}"
    state = json.loads((final / "trainer_state.json").read_text())
    straight = json.loads((zero2_run / "checkpoints" / f"step_{STEPS}" / "trainer_state.json"
                           ).read_text())
    assert state["world_size"] == 1 and state["consumed_samples"] == 32
    assert [h["lr"] for h in state["loss_history"]] == pytest.approx(
        [h["lr"] for h in straight["loss_history"]])


# ------------------------------------------------------------------------------------- accumulation
def test_accumulation_and_rank_equivalence(zero2_run, assets, tmp_path):
    """micro 4 x accum 1 == micro 1 x accum 4 (1 process) == micro 1 x accum 2 x 2 ranks.
    (The two 1-process runs are independent: they run side by side.)"""
    runs = {"m4": ("4", "1"), "a4": ("1", "4")}
    procs = run_trains([base_args(assets, tmp_path / name, "--micro_batch_size", micro,
                                  "--gradient_accumulation_steps", gas, "--zero_stage", "2")
                        for name, (micro, gas) in runs.items()])
    for name, proc in zip(runs, procs):
        check_ok(proc)
        runs[name] = losses(only_run_dir(tmp_path / name) / "checkpoints" / f"step_{STEPS}")
    two_ranks = losses(zero2_run / "checkpoints" / f"step_{STEPS}")
    assert np.max(np.abs(np.array(runs["m4"]) - np.array(runs["a4"]))) <= 1e-5, runs
    assert np.max(np.abs(np.array(runs["m4"]) - np.array(two_ranks))) <= 1e-5, (runs, two_ranks)


# ------------------------------------------------------------------------------------- multi-node
def test_two_nodes_on_loopback_match_single_node(zero2_run, assets, tmp_path):
    port = str(free_port())
    procs = []
    for node in (0, 1):
        out = tmp_path / f"node{node}"
        cmd = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               str(REPO / "trainer" / "train.py"),
               *base_args(assets, tmp_path / "out", "--micro_batch_size", "1",
                          "--gradient_accumulation_steps", "2", "--zero_stage", "2")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=open(out, "w"),
                                      stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], (tmp_path / "node0").read_text()[-3000:]
    two_nodes = losses(only_run_dir(tmp_path / "out") / "checkpoints" / f"step_{STEPS}")
    single = losses(zero2_run / "checkpoints" / f"step_{STEPS}")
    assert np.max(np.abs(np.array(two_nodes) - np.array(single))) <= 1e-6, (two_nodes, single)


# ------------------------------------------------------------------------------------- ZeRO-3
def test_zero3_two_ranks_untied_model(assets, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    run_train(base_args(assets, tmp_path, "--micro_batch_size", "2", "--zero_stage", "3",
                        "--save_optimizer", model="qwen2"),
              launcher="deepspeed", nproc=2)
    final = only_run_dir(tmp_path) / "checkpoints" / f"step_{STEPS}"
    curve = losses(final)
    assert np.mean(curve[-2:]) < np.mean(curve[:2]) - 0.3, curve
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    assert model.lm_head.weight.shape == (124, 64) and not model.config.tie_word_embeddings
    assert (final / "deepspeed" / "ds").is_dir()


# ------------------------------------------------------------------------------------- LoRA + tokens
@pytest.fixture(scope="module")
def tool_data(assets, tmp_path_factory):
    """A dataset encoded with a tokenizer that has 2 added tokens (ids 124, 125) used in the data."""
    root = tmp_path_factory.mktemp("tooldata")
    tok = build_tokenizer(root / "enc_tok")
    tok.add_tokens(["<tool>", "<obs>"], special_tokens=True)
    return write_dataset(root, "tools", tok, num_samples=64, seed=5, extra_ids=[124, 125])


def lora_args(assets, tool_data, root: Path) -> list[str]:
    lora_cfg = root / "lora.json"
    lora_cfg.write_text(json.dumps({"r": 8, "alpha": 16, "dropout": 0.0}))
    return ["--model_path", str(assets["llama"]), "--data_path", str(tool_data), *COMMON,
            "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--max_steps", "6",
            "--micro_batch_size", "4", "--use_lora",
            "--lora_config_path", str(lora_cfg), "--add_tokens", "<extra>", "--save_steps", "3",
            "--save_optimizer"]


@pytest.fixture(scope="module")
def tool_runs(assets, tool_data, tmp_path_factory) -> dict:
    """The first LoRA run of test_lora_with_added_tokens_... and the run of
    test_token_id_beyond_vocab_..., side by side: two independent 1-process runs."""
    from shardfmt import tokenizer_identity
    root = tmp_path_factory.mktemp("tool_runs")
    # the same tool data without the added tokens in the manifest: ids 124/125 >= 124 rows
    bad = write_dataset(root, "bad", assets["tokenizer"], num_samples=8, seed=5,
                        extra_ids=[124, 125], tokenizer_info=tokenizer_identity(assets["tokenizer"]))
    args = lora_args(assets, tool_data, root)
    lora, refused = run_trains([
        args + ["--output_path", str(root / "a")],
        ["--model_path", str(assets["llama"]), "--data_path", str(bad), "--output_path",
         str(root / "out"), "--max_steps", "2"]])
    return {"lora_args": args, "lora": lora, "lora_out": root / "a", "refused": refused,
            "refused_out": root / "out"}


def test_lora_with_added_tokens_trains_saves_reloads_and_resumes(assets, tool_runs, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = tool_runs["lora_args"]
    check_ok(tool_runs["lora"])
    run = only_run_dir(tool_runs["lora_out"])
    final = run / "checkpoints" / "step_6"
    curve = losses(final)
    assert curve[-1] < curve[0] - 0.1, curve  # r=8 adapters on a random tiny base learn slowly
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(str(final))
    assert len(tok) == 127 and tok.convert_tokens_to_ids(["<tool>", "<obs>", "<extra>"]) == [124, 125, 126]
    assert tok.convert_tokens_to_ids("<pad>") == 3  # existing specials kept
    # reload onto a base resized the same way
    base = AutoModelForCausalLM.from_pretrained(str(assets["llama"]), dtype=torch.float32)
    base.resize_token_embeddings(len(tok), mean_resizing=True)
    model = PeftModel.from_pretrained(base, str(final))
    merged = model.merge_and_unload()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    [delta_key] = [k for k in adapter if "embed_tokens" in k and "trainable_tokens_delta" in k]
    rows = merged.get_input_embeddings().weight[124:127].detach()
    assert torch.equal(rows, adapter[delta_key].float())  # the trained rows came back
    with torch.no_grad():  # the adapted model predicts the counting task better than the base
        ids = torch.tensor([[4 + i for i in range(10, 40)]])
        adapted = float(merged(input_ids=ids, labels=ids).loss)
        base = float(AutoModelForCausalLM.from_pretrained(str(assets["llama"]))(input_ids=ids,
                                                                               labels=ids).loss)
        assert adapted < base - 0.05, (adapted, base)
    # resume the LoRA run from step 3 (the original crashed here): same losses as straight
    run_train(args + ["--output_path", str(tmp_path / "b"), "--load_ckpt_path",
                      str(run / "checkpoints" / "step_3")])
    resumed = losses(only_run_dir(tmp_path / "b") / "checkpoints" / "step_6")
    assert np.max(np.abs(np.array(resumed) - np.array(curve))) <= 1e-6, (curve, resumed)


# ------------------------------------------------------------------------------------- bad inputs
def test_token_id_beyond_vocab_fails_before_step_1(tool_runs):
    """The same tool data without the added tokens in the manifest: ids 124/125 >= 124 rows.
    (The run is started by the tool_runs fixture, beside the first LoRA run.)"""
    proc, out = tool_runs["refused"], tool_runs["refused_out"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "largest token id 125 but the model has 124 embedding rows" in proc.stderr
    assert not out.exists() or not list(out.rglob("train_log.jsonl"))
