"""The checks behind `bash bench/gpu_check.sh` (see there). Each check returns a table row
(check, result, detail, ok); a failed check never stops the others; exit 1 if any row is not ok.

Models are built from configs with random weights (no downloads); training runs go through
trainer/train.py exactly as a user runs it, on synthetic counting documents (learnable: the loss
must fall).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "trainer"))


def _row(check: str, ok: bool, result: str, detail: str = "") -> dict:
    return {"check": check, "ok": ok, "result": result, "detail": detail}


def check_flash_varlen(torch) -> dict:
    """flash_attention_2 on a flattened packed batch == sdpa_varlen (loss and gradients, bf16)."""
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        return _row("flash-attn varlen == sdpa_varlen", True, "skipped",
                    "flash-attn not installed (pip install '.[flash]')")
    import numpy as np
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shardfmt import Sample
    from trainer.attention import register_varlen_sdpa
    from trainer.data import collate, model_inputs
    from trainer.loss import token_loss_sum
    register_varlen_sdpa()
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    rng = np.random.default_rng(0)
    lens = [300, 700, 48, 1000]
    sample = Sample(rng.integers(4, 32000, sum(lens)).astype(np.int32), np.ones(sum(lens), bool),
                    np.array(lens, np.int32))
    batch = collate([sample], flatten=True)
    results = {}
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    for impl in ("flash_attention_2", "sdpa_varlen"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl,
                                                 dtype=torch.bfloat16).cuda()
        model.load_state_dict(state)
        loss = token_loss_sum(model(**model_inputs(batch, impl, torch.bfloat16,
                                                   torch.device("cuda"))).logits,
                              batch["labels"].cuda())
        loss.backward()
        results[impl] = (float(loss), {n: p.grad.float() for n, p in model.named_parameters()})
    (lf, gf), (ls, gs) = results["flash_attention_2"], results["sdpa_varlen"]
    loss_rel = abs(lf - ls) / abs(ls)
    grad_rel = max(float((gf[n] - gs[n]).norm() / (gs[n].norm() + 1e-12)) for n in gs)
    ok = loss_rel <= 1e-2 and grad_rel <= 5e-2  # bf16: two kernels, different summation orders
    return _row("flash-attn varlen == sdpa_varlen", ok, "match" if ok else "MISMATCH",
                f"bf16, 4 packed docs: loss rel diff {loss_rel:.1e} (<= 1e-2), worst grad rel "
                f"diff {grad_rel:.1e} (<= 5e-2)")


def check_fused_head(torch) -> dict:
    """The fused head (trainer/loss.py) on CUDA == cross-entropy of full logits, fp32 and bf16."""
    import torch.nn.functional as F

    from trainer.loss import linear_cross_entropy_sum
    details, ok = [], True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        torch.manual_seed(0)
        h = torch.randn(4096, 1024, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(32000, 1024, device="cuda", dtype=dtype) * 0.02).requires_grad_()
        t = torch.randint(0, 32000, (4096,), device="cuda")
        ref = F.cross_entropy((h @ w.t()).float(), t, reduction="sum")
        gh, gw = torch.autograd.grad(ref, (h, w))
        got = linear_cross_entropy_sum(h, w, t)
        fh, fw = torch.autograd.grad(got, (h, w))
        rel = max(abs(float(got - ref)) / abs(float(ref)),
                  float((fh.float() - gh.float()).norm() / gh.float().norm()),
                  float((fw.float() - gw.float()).norm() / gw.float().norm()))
        ok &= rel <= tol
        details.append(f"{str(dtype).split('.')[-1]} worst rel diff {rel:.1e} (<= {tol:g})")
    return _row("fused head (CUDA) == full logits", ok, "match" if ok else "MISMATCH",
                "; ".join(details))


def _prepare_assets(workdir: Path) -> dict:
    """A ~100M Llama (random weights, saved) + word-level tokenizer + counting-document data."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer_testlib import build_tokenizer, write_dataset
    tok = build_tokenizer(workdir / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(workdir / "model"))
    data = write_dataset(workdir / "data", "train", tok, num_samples=2000, seed=1, max_length=512)
    return {"model": workdir / "model", "data": data, "params": n}


def _train(assets: dict, out: Path, *extra: str, timeout: int = 300) -> tuple[bool, list, str]:
    cmd = [sys.executable, str(ROOT / "trainer" / "train.py"), "--model_path", str(assets["model"]),
           "--data_path", str(assets["data"]), "--output_path", str(out), "--no_timestamp",
           "--logging_steps", "1", "--seed", "1", "--num_workers", "1", *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return False, [], proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
    latest = out / "run" / "checkpoints"
    state = json.loads((latest / (latest / "latest").read_text().strip() /
                        "trainer_state.json").read_text())
    return True, [h["loss"] for h in state["loss_history"]], ""


def _falls(losses: list, by: float) -> bool:
    k = max(1, len(losses) // 10)
    return len(losses) >= 2 and sum(losses[-k:]) / k < sum(losses[:k]) / k - by


def check_bf16_training(assets: dict, work: Path) -> dict:
    t0 = time.perf_counter()
    ok, losses, err = _train(assets, work / "bf16", "--from_scratch", "--precision", "bf16",
                             "--max_steps", "50", "--micro_batch_size", "8",
                             "--learning_rate", "1e-3", "--warmup_ratio", "0.1")
    if not ok:
        return _row(f"bf16 training ({assets['params'] / 1e6:.0f}M, 50 steps)", False, "FAILED", err)
    falls = _falls(losses, 0.5)
    return _row(f"bf16 training ({assets['params'] / 1e6:.0f}M, 50 steps)", falls,
                "loss falls" if falls else "LOSS DID NOT FALL",
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - t0:.0f} s")


def check_qlora(assets: dict, work: Path) -> dict:
    ok, losses, err = _train(assets, work / "qlora", "--use_lora", "--quantization", "4bit",
                             "--precision", "bf16", "--max_steps", "20", "--micro_batch_size", "8",
                             "--learning_rate", "1e-3", "--optimizer", "paged_adamw8bit")
    if not ok:
        return _row("QLoRA 4-bit (NF4, bf16 compute)", False, "FAILED", err)
    from trainer.export import REPORT, export
    out = export(work / "qlora" / "run", work / "qlora_export", base_model=str(assets["model"]))
    diff = json.loads((out / REPORT).read_text())["max_logit_diff_merged_vs_quantized"]
    falls = _falls(losses, 0.1)
    return _row("QLoRA 4-bit (NF4, bf16 compute)", falls and diff < 5.0,
                "trains, exports" if falls else "LOSS DID NOT FALL",
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged vs quantised max logit diff "
                f"{diff:.3g}")


def check_dpo_precomputed(assets: dict, work: Path, *, precision: str = "bf16") -> dict:
    """`python -m trainer.reference_logps` on the GPU, then DPO on those log-probs: the first
    step's loss is ln 2 (policy == reference: the precomputed file was made in the same precision
    and attention, and the trainer checks that) and the loss falls."""
    import math

    from preference_testlib import make_pairs, write_pairs
    from transformers import AutoTokenizer
    name = f"DPO on precomputed reference log-probs ({precision})"
    tok = AutoTokenizer.from_pretrained(str(assets["model"]))
    pairs = write_pairs(work / "pref", "pairs", tok, make_pairs(256, seed=2))
    ref = subprocess.run([sys.executable, "-m", "trainer.reference_logps", "--model_path",
                          str(assets["model"]), "--data_path", str(pairs), "--precision",
                          precision], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ref.returncode != 0:
        return _row(name, False, "FAILED", "reference_logps: " + ref.stderr.strip()[-300:])
    ok, losses, err = _train(dict(assets, data=pairs), work / "dpo", "--objective", "dpo",
                             "--precomputed_ref_logps", "--precision", precision, "--max_steps",
                             "20", "--micro_batch_size", "4", "--learning_rate", "5e-4")
    if not ok:
        return _row(name, False, "FAILED", err)
    first = abs(losses[0] - math.log(2))
    good = first < 2e-2 and _falls(losses, 0.0)  # bf16: the same kernels, so ~1e-3 expected
    return _row(name, good, "ln 2 at step 1, loss falls" if good else "MISMATCH",
                f"|loss_1 - ln 2| = {first:.1e} (< 2e-2); loss {losses[0]:.4f} -> "
                f"{losses[-1]:.4f}")


def check_zero3(assets: dict, work: Path) -> dict:
    runs = {}
    for stage in ("2", "3"):
        ok, losses, err = _train(assets, work / f"zero{stage}", "--zero_stage", stage,
                                 "--precision", "fp32", "--max_steps", "5",
                                 "--micro_batch_size", "4", "--learning_rate", "1e-4")
        if not ok:
            return _row("ZeRO-3 on one GPU == ZeRO-2", False, "FAILED", f"stage {stage}: {err}")
        runs[stage] = losses
    worst = max(abs(a - b) for a, b in zip(runs["2"], runs["3"]))
    ok = worst <= 1e-3  # fp32, TF32 matmuls and different reduction orders
    return _row("ZeRO-3 on one GPU == ZeRO-2", ok, "match" if ok else "MISMATCH",
                f"5 steps fp32: worst loss diff {worst:.1e} (<= 1e-3)")


def check_throughput(work: Path) -> dict:
    out = work / "throughput.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), "--hidden",
                           "2048", "--layers", "12", "--seq_len", "2048", "--micro_batch_size", "2",
                           "--steps", "10", "--warmup", "3", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.is_file():
        return _row("tokens/s + MFU (~0.7B, seq 2048)", False, "FAILED",
                    (proc.stderr.strip().splitlines() or ["no output"])[-1])
    r = json.loads(out.read_text())
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a (unknown GPU peak)"
    return _row(f"tokens/s + MFU ({r['matmul_params'] / 1e9:.2f}B, seq 2048)", True,
                f"{r['tokens_per_s_per_gpu']:,.0f} tok/s, MFU {mfu}",
                f"{r['device']}, {r['dtype']}, peak mem {r['peak_memory_gib']:.1f} GiB")


def main() -> int:
    import torch
    if not torch.cuda.is_available():
        print(f"skip: bench/gpu_check.sh needs a CUDA GPU (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False)")
        return 0
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        steps = [("flash-attn varlen == sdpa_varlen", lambda: check_flash_varlen(torch)),
                 ("fused head (CUDA) == full logits", lambda: check_fused_head(torch))]
        assets: dict = {}
        steps += [("prepare", lambda: assets.update(_prepare_assets(work)) or None),
                  ("bf16 training", lambda: check_bf16_training(assets, work)),
                  ("QLoRA 4-bit", lambda: check_qlora(assets, work)),
                  ("DPO, precomputed reference", lambda: check_dpo_precomputed(assets, work)),
                  ("ZeRO-3 on one GPU", lambda: check_zero3(assets, work)),
                  ("tokens/s + MFU", lambda: check_throughput(work))]
        for name, fn in steps:
            t0 = time.perf_counter()
            try:
                row = fn()
            except Exception as e:  # noqa: BLE001 - reported as a failed row, the others still run
                row = _row(name, False, "ERROR", f"{type(e).__name__}: {e}")
            if row is not None:
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(f"[{row['seconds']:5.0f} s] {row['check']}: {row['result']}", flush=True)
    print(f"\nGPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"total {time.perf_counter() - start:.0f} s\n")
    print("| check | result | detail | ok |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['result']} | {r['detail']} | {'yes' if r['ok'] else 'NO'} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
