"""Step-0 loss of an extended vocabulary: --new_token_init decompose vs mean.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/new_token_init.py            # 300 pretraining steps
    HF_HUB_OFFLINE=1 .venv/bin/python bench/new_token_init.py --steps 60 --vocab_size 8000

1. A tiny Llama (llama2 vocabulary, 32,000 rows, untied, hidden 64, 2 layers;
   run_scripts/tiny_model.py) is pretrained from scratch for --steps optimizer steps on
   zh_xiyouji.txt encoded with the llama2 tokenizer (`encoder/main.py --encode_type pretrain
   --merge_data`, 256-token rows; `trainer/train.py`, 1 process, micro-batch 8, lr 3e-3 cosine).
2. llama2 is extended on the same book: `python -m encoder.tokenizer extend --vocab_size N`
   (every 100th line held out of the tokenizer training).
3. The pretrained model is grown to the extended tokenizer with trainer/vocab.py's
   `grow_embeddings` twice, init `decompose` and init `mean`, and the mean next-token loss is
   computed (no training: step 0) on the held-out lines (every 100th line of the book) encoded with
   the extended tokenizer, BOS first, packed into 256-token rows. For reference the same lines
   under the llama2 tokenizer with the pretrained model (what the model knows) are given too.
The losses are per token of each tokenizer; extended tokens are fewer and longer, so only the two
extended-tokenizer rows compare directly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BOOK = SHARED / "data" / "zh_xiyouji.txt"
LLAMA2 = SHARED / "tokenizers" / "llama2"
ROW = 256
HELDOUT_EVERY = 100


def run(cmd: list) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    sys.stderr.write(proc.stdout[-1500:])


def heldout_rows(tokenizer) -> "torch.Tensor":
    import torch
    lines = [ln for ln in BOOK.read_text(encoding="utf-8").splitlines() if ln.strip()]
    ids: list[int] = []
    for i, line in enumerate(lines):
        if i % HELDOUT_EVERY == HELDOUT_EVERY - 1:
            ids += tokenizer(line)["input_ids"]  # BOS as the tokenizer adds it
    n = len(ids) // ROW
    return torch.tensor(ids[:n * ROW]).view(n, ROW)


def mean_loss(model, rows) -> float:
    import torch
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(rows), 8):
            batch = rows[k:k + 8]
            out = model(input_ids=batch, labels=batch)
            n = batch.numel() - batch.shape[0]
            total += float(out.loss) * n
            count += n
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps")
    ap.add_argument("--vocab_size", type=int, default=20000, help="extend: trained vocabulary size")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "new_token_init"))
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    if not BOOK.is_file():
        print(f"skipped: {BOOK} not found", file=sys.stderr)
        return 0
    out = Path(args.out)
    py = sys.executable
    t0 = time.time()
    base = out / f"base_{args.steps}"
    if not (base / "model.safetensors").is_file():  # cached between runs
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        run([py, "run_scripts/tiny_model.py", "--tokenizer", LLAMA2, "--output", out / "init"])
        run([py, "encoder/main.py", "--tokenizer_path", LLAMA2, "--data_loader_path",
             "encoder/user_data_loader/text.py", "--data_loader_args", f"path={BOOK}", "split=line",
             "--corpus_name", "zh_llama2", "--encode_type", "pretrain", "--output_path", out / "data",
             "--max_length", ROW, "--merge_data"])
        run([py, "trainer/train.py", "--model_path", out / "init", "--data_path",
             out / "data" / "zh_llama2", "--output_path", out / "runs", "--save_name", "base",
             "--no_timestamp", "--max_steps", args.steps, "--micro_batch_size", 8,
             "--learning_rate", 3e-3, "--lr_scheduler", "cosine", "--warmup_ratio", 0.05,
             "--logging_steps", 50])
        run([py, "-m", "trainer.export", "--checkpoint", out / "runs" / "base", "--output", base])
    ext = out / f"llama2_zh_{args.vocab_size}"
    if not (ext / "tokenizer.json").is_file():
        run([py, "-m", "encoder.tokenizer", "extend", "--base", LLAMA2, "--data_loader_path",
             "encoder/user_data_loader/text.py", "--data_loader_args", f"path={BOOK}", "split=line",
             "--vocab_size", args.vocab_size, "--heldout_every", HELDOUT_EVERY, "--output", ext])

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from trainer.vocab import grow_embeddings
    base_tok = AutoTokenizer.from_pretrained(LLAMA2)
    ext_tok = AutoTokenizer.from_pretrained(ext)
    ext_rows, base_rows = heldout_rows(ext_tok), heldout_rows(base_tok)
    result = {"pretrain_steps": args.steps, "extended_len": len(ext_tok),
              "heldout_tokens_llama2": int(base_rows.numel()),
              "heldout_tokens_extended": int(ext_rows.numel())}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    result["loss_llama2_pretrained"] = mean_loss(model, base_rows)
    for init in ("decompose", "mean"):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        torch.manual_seed(0)
        grow_embeddings(model, len(ext_tok), init=init, why="bench", model_tokenizer=base_tok,
                        tokenizer=ext_tok, log_it=False)
        result[f"step0_loss_{init}"] = mean_loss(model, ext_rows)
    result["seconds"] = round(time.time() - t0, 1)
    print("| tokenizer / init | held-out tokens | step-0 loss |\n|---|---|---|")
    print(f"| llama2 (what the pretrained model saw) | {result['heldout_tokens_llama2']} | "
          f"{result['loss_llama2_pretrained']:.3f} |")
    for init in ("decompose", "mean"):
        print(f"| extended ({len(ext_tok)} tokens), --new_token_init {init} | "
              f"{result['heldout_tokens_extended']} | {result[f'step0_loss_{init}']:.3f} |")
    print(f"\npretrained {args.steps} steps; {result['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
