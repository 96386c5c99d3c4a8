"""GPU training throughput: tokens/s/GPU and MFU of a plain HF forward/backward/AdamW loop.

    .venv/bin/python bench/gpu_throughput.py                          # skips without a CUDA GPU
    .venv/bin/python bench/gpu_throughput.py --model_path MODEL_DIR   # a real model's config
    .venv/bin/python bench/gpu_throughput.py --peak_tflops 312        # GPU not in the table

One process, one GPU (tokens/s/GPU: run it on each GPU type you care about; the multi-GPU trainer
is `deepspeed trainer/train.py`). The model is built from a config (random weights: the speed does
not depend on them) — `--model_path`'s config.json, else a Llama of `--hidden/--layers`. Batches
are full `--seq_len` sequences of random token ids, bf16 autocast when supported (else fp16),
SDPA attention, AdamW. `--warmup` steps are not timed; then `--steps` steps are, with
`torch.cuda.synchronize()` at both ends.

  MFU = 6 · N · tokens/s ÷ peak FLOP/s, N = parameters excluding the input embedding matrix
  (a lookup, not a matmul; the LM head is counted). The 6·N rule ignores attention's
  O(seq_len²) term, so MFU is slightly understated at long sequences.
Peak dense bf16/fp16 tensor TFLOP/s from a small table of GPU names (datasheet figures, no
sparsity); override with --peak_tflops. Without CUDA it prints one "skip:" line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Dense bf16 (V100: fp16) tensor-core peak, TFLOP/s, per the vendor datasheets; first match wins;
# None = not known here (pass --peak_tflops).
PEAK_TFLOPS: list[tuple[str, float | None]] = [
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("GH200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", None), ("A10", 125.0),
    ("V100", 125.0),
]


def peak_for(name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def build_model(args, torch):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
    if args.model_path:
        config = AutoConfig.from_pretrained(args.model_path)
    else:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=(args.intermediate
                                                or int(args.hidden * 8 / 3 // 256 * 256)),
                             num_hidden_layers=args.layers,
                             num_attention_heads=max(1, args.hidden // 128),
                             num_key_value_heads=max(1, args.hidden // 128),
                             max_position_embeddings=max(4096, args.seq_len))
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def matmul_params(model) -> int:
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total if tied else total - emb.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model_path", help="a HF model dir; only its config.json is used")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=0, help="default ≈ 8/3 · hidden")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--micro_batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--peak_tflops", type=float,
                    help="peak TFLOP/s of the device (overrides the table)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": test the code path
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"skip: no CUDA GPU (torch {torch.__version__}, torch.cuda.is_available() is False); "
              f"tokens/s/GPU and MFU need one")
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": "no CUDA GPU"}))
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        name, amp = "cpu", torch.bfloat16
    peak = args.peak_tflops or peak_for(name)

    torch.manual_seed(0)
    model = build_model(args, torch).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    n = matmul_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.micro_batch_size, args.seq_len), device=device)

    def step():
        with torch.autocast(device.type, dtype=amp):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    tokens = args.steps * args.micro_batch_size * args.seq_len
    tps = tokens / elapsed
    flops = 6 * n * tps
    mfu = flops / (peak * 1e12) if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"device: {name}; model: {n / 1e6:,.0f}M matmul params "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M total), {amp}, SDPA, AdamW; "
          f"micro-batch {args.micro_batch_size} × {args.seq_len} tokens; {args.steps} timed steps "
          f"after {args.warmup} warm-up; final loss {float(loss):.3f}\n")
    print("| GPU | tokens/s/GPU | model TFLOP/s (6N) | peak TFLOP/s | MFU | peak memory |\n"
          "|---|---|---|---|---|---|")
    print(f"| {name} | {tps:,.0f} | {flops / 1e12:,.1f} | {peak if peak else 'unknown'} | "
          f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a (pass --peak_tflops)'} | "
          f"{mem:.1f} GiB |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": name, "tokens_per_s_per_gpu": tps, "model_tflops": flops / 1e12,
            "peak_tflops": peak, "mfu": mfu, "matmul_params": n, "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size, "steps": args.steps,
            "dtype": str(amp), "peak_memory_gib": mem}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
