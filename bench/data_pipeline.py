"""Data pipeline: batches/s and tokens/s out of the trainer's own DataLoader + collate + model inputs,
against the tokens/s a training step of the tiny benchmark model consumes.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/data_pipeline.py --repeats 3

Data: alpaca en+zh (1,999 documents) encoded by `encoder/main.py --encode_type qa --merge_data
--max_length 2048` with llama2 (231 packed samples, 99.8% fill), cached under bench_out/pipeline/
(bench/train_throughput.py uses the same datasets and the same tiny model).

Pipeline side, for micro-batch 1 and 4 and DataLoader num_workers 0 and 1: the loader is
`trainer.data.train_loader` (GlobalSampler shuffle, RankSampler, `collate`: padding, labels,
position ids, segment ids), exactly as trainer/train.py builds it for a 1-rank run, and every
batch also goes through `trainer.data.model_inputs(batch, ATTN, fp32, cpu)` in the main process,
as the training step does. `--attn` (ATTN) is the trainer's: `sdpa_varlen` (its default here:
micro-batch flattened into one row, document boundaries) or `sdpa` (padding and the (B, 1, L, L)
block-diagonal causal mask).
No torch.distributed group is needed (train_loader takes rank/world size as arguments).
Timed: `--batches` batches after the first one (the first pays the worker start-up), per repeat a
fresh loader; tokens = real (non-pad) tokens, loss tokens = labels != -100.

Consumption side (at `--consumption_micro_batch`, default 1 packed sample = 2,048 tokens per
step; tokens/s per step does not improve at micro-batch 4): one optimizer step of the tiny Llama (llama2 vocab 32,000, hidden 64, 2 layers,
fp32, `--attn`, AdamW) per micro-batch of packed samples: forward and the
trainer's loss (`trainer.loss.forward_loss_sum`, fused head), backward, AdamW step. Plain torch without the DeepSpeed engine, so
this is an upper bound of what the trainer consumes (its engine only adds time): the reported
ratio pipeline/consumption is a lower bound. Inputs are pre-collated, so the step time holds no
data loading. Medians of `--repeats` runs; torch uses `--threads` threads on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
TOKENIZER = "llama2"
DATA_FILES = ("alpaca_en_demo.json", "alpaca_zh_demo.json")
MAX_LENGTH = 2048
# The benchmark model (items 3 and 5): a tiny Llama over llama2's vocabulary.
TINY_LLAMA = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def set_threads(n: int) -> None:
    """Before torch is imported: `n` intra-op threads here and in child processes."""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ensure_datasets(out: Path, shared: Path = SHARED) -> dict[str, Path]:
    """alpaca en+zh encoded packed (--merge_data) and unpacked, llama2, max_length 2048 (cached)."""
    tok = shared / "tokenizers" / TOKENIZER
    paths = ",".join(str(shared / "data" / f) for f in DATA_FILES)
    result = {}
    for name, extra in (("alpaca_packed", ["--merge_data"]), ("alpaca_unpacked", [])):
        cmd = [sys.executable, str(ROOT / "encoder" / "main.py"), "--tokenizer_path", str(tok),
               "--data_loader_path", str(ROOT / "encoder" / "user_data_loader" / "alpaca.py"),
               "--data_loader_args", f"path={paths}", "--encode_type", "qa",
               "--max_length", str(MAX_LENGTH), "--output_path", str(out), "--corpus_name", name,
               "--overwrite"] + extra
        stamp = out / f"{name}.cmd"
        key = json.dumps(cmd[1:])
        if not ((out / name / "manifest.json").is_file() and stamp.is_file()
                and stamp.read_text() == key):
            print(f"encoding {name} ...", file=sys.stderr)
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            stamp.write_text(key)
        result[name] = out / name
    return result


def ensure_model(out: Path, shared: Path = SHARED) -> Path:
    """The tiny Llama (seed 0) with the llama2 tokenizer saved beside it (cached)."""
    d = out / "tiny_llama"
    stamp = d / "bench_config.json"
    key = json.dumps(TINY_LLAMA, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == key:
        return d
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(str(d))
    AutoTokenizer.from_pretrained(str(shared / "tokenizers" / TOKENIZER)).save_pretrained(str(d))
    stamp.write_text(key)
    return d


def load_tiny_model(model_dir: Path, attn: str):
    import torch

    from trainer.model import load_training_model
    return load_training_model(str(model_dir), from_scratch=False, dtype=torch.float32,
                               attn_implementation=attn).train()


# -- pipeline side --------------------------------------------------------------------------------
def measure_pipeline(ds, *, micro_batch: int, workers: int, batches: int, seed: int,
                     attn: str) -> dict:
    import torch

    from shardfmt import GlobalSampler
    from trainer.data import FLATTENED_ATTENTION, count_loss_tokens, model_inputs, train_loader
    sampler = GlobalSampler(len(ds), seed=seed, shuffle=True)
    loader = train_loader(ds, sampler, start=0, rank=0, world_size=1, micro_batch_size=micro_batch,
                          pad_id=0, flatten=attn in FLATTENED_ATTENTION, num_workers=workers,
                          seed=seed)
    it = iter(loader)
    model_inputs(next(it), attn, torch.float32, torch.device("cpu"))  # worker start-up, warm-up
    tokens = loss_tokens = padded = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        model_inputs(batch, attn, torch.float32, torch.device("cpu"))
        tokens += batch["num_tokens"]
        loss_tokens += count_loss_tokens(batch)
        padded += batch["input_ids"].numel()
    elapsed = time.perf_counter() - t0
    del it  # shuts the worker down
    return {"batches_per_s": batches / elapsed, "tokens_per_s": tokens / elapsed,
            "loss_tokens_per_s": loss_tokens / elapsed, "fill": tokens / padded}


# -- consumption side -----------------------------------------------------------------------------
def measure_step(model, optimizer, batches: list[dict], attn: str) -> dict:
    """Optimizer steps over pre-collated micro-batches (one micro-batch per step)."""
    import torch

    from trainer.data import count_loss_tokens, model_inputs
    from trainer.loss import forward_loss_sum, fused_head_problem
    fused = fused_head_problem(model) is None
    tokens = loss_tokens = 0
    t0 = time.perf_counter()
    for batch in batches:
        loss = forward_loss_sum(model, model_inputs(batch, attn, torch.float32, torch.device("cpu")),
                                batch["labels"], fused=fused) / max(count_loss_tokens(batch), 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch["num_tokens"]
        loss_tokens += count_loss_tokens(batch)
    elapsed = time.perf_counter() - t0
    return {"steps_per_s": len(batches) / elapsed, "tokens_per_s": tokens / elapsed,
            "loss_tokens_per_s": loss_tokens / elapsed}


def collated(ds, micro_batch: int, count: int, seed: int, attn: str) -> list[dict]:
    from shardfmt import GlobalSampler
    from trainer.data import FLATTENED_ATTENTION, collate
    idx = GlobalSampler(len(ds), seed=seed).indices(range(micro_batch * count)).tolist()
    return [collate([ds[i] for i in idx[k:k + micro_batch]], pad_id=0,
                    flatten=attn in FLATTENED_ATTENTION)
            for k in range(0, len(idx), micro_batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--micro_batches", default="1,4")
    ap.add_argument("--attn", default="sdpa_varlen", choices=("sdpa_varlen", "sdpa"),
                    help="the trainer's attention path (sdpa_varlen: its default on CPU)")
    ap.add_argument("--workers", default="0,1")
    ap.add_argument("--batches", type=int, default=60,
                    help="timed batches per pipeline run at micro-batch 1 (divided by the micro-batch)")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per consumption run")
    ap.add_argument("--consumption_micro_batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared machine)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "pipeline"))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_datasets(out, Path(args.shared))
    model_dir = ensure_model(out, Path(args.shared))

    import torch
    torch.set_num_threads(args.threads)
    from shardfmt import open_dataset
    ds = open_dataset(data["alpaca_packed"])
    mbs = [int(x) for x in args.micro_batches.split(",")]
    workers = [int(x) for x in args.workers.split(",")]

    pipe: dict[str, list[dict]] = {}
    cons: dict[str, list[dict]] = {}
    model = load_tiny_model(model_dir, args.attn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=False)
    cmb = args.consumption_micro_batch
    measure_step(model, optimizer, collated(ds, cmb, 1, args.seed + 99, args.attn),
                 args.attn)  # warm-up step
    for r in range(args.repeats):  # interleaved: the machine is shared
        for mb in mbs:
            for w in workers:
                pipe.setdefault(f"{mb}/{w}", []).append(measure_pipeline(
                    ds, micro_batch=mb, workers=w, batches=max(10, args.batches // mb),
                    seed=args.seed + r, attn=args.attn))
        cons.setdefault("step", []).append(
            measure_step(model, optimizer, collated(ds, cmb, args.steps, args.seed + r, args.attn),
                         args.attn))
    med = lambda runs: {k: statistics.median(x[k] for x in runs) for k in runs[0]}  # noqa: E731
    pmed = {k: med(v) for k, v in pipe.items()}
    cmed = {k: med(v) for k, v in cons.items()}

    print(f"dataset: {ds.num_tokens:,} tokens in {len(ds)} packed samples (alpaca en+zh, llama2, "
          f"--merge_data --max_length {MAX_LENGTH}); model: tiny Llama hidden "
          f"{TINY_LLAMA['hidden_size']}, {TINY_LLAMA['num_hidden_layers']} layers, vocab "
          f"{TINY_LLAMA['vocab_size']}, fp32, {args.attn}; {args.threads} torch thread(s); "
          f"medians of {args.repeats} runs\n")
    print("| micro-batch | workers | batches/s | tokens/s | loss tokens/s | training step consumes "
          "(tokens/s) | pipeline / consumption |\n|---|---|---|---|---|---|---|")
    for mb in mbs:
        for w in workers:
            p, c = pmed[f"{mb}/{w}"], cmed["step"]
            print(f"| {mb} | {w} | {p['batches_per_s']:,.1f} | {p['tokens_per_s']:,.0f} | "
                  f"{p['loss_tokens_per_s']:,.0f} | {c['tokens_per_s']:,.0f} "
                  f"({c['steps_per_s']:.2f} steps/s) | {p['tokens_per_s'] / c['tokens_per_s']:,.0f}× |")
    print(f"\nPipeline: `train_loader` + `model_inputs` ({args.attn}) per batch. "
          "Consumption: forward + loss + backward + AdamW step of the tiny model on the same "
          f"packed data at micro-batch {cmb} (per token, micro-batch 4 is not cheaper: the "
          "vocabulary projection is linear in tokens), without DeepSpeed (an upper bound of the "
          "trainer's rate).")
    if args.json:
        Path(args.json).write_text(json.dumps({"pipeline_median": pmed, "consumption_median": cmed,
                                               "pipeline_runs": pipe, "consumption_runs": cons,
                                               "threads": args.threads, "model": TINY_LLAMA},
                                              indent=2))


if __name__ == "__main__":
    main()
