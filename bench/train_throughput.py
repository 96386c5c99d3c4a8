"""Training throughput on CPU: our trainer with packing and unpacked vs HF `transformers.Trainer` +
`DataCollatorForSeq2Seq` (padding), tiny Llama, same data, same optimizer steps.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py --steps 4 --repeats 3

Data: alpaca en+zh (1,999 documents), llama2, max_length 2048, encoded by `encoder/main.py --encode_type
qa` with and without `--merge_data` (cached under bench_out/pipeline/, shared with
bench/data_pipeline.py). Model: a tiny Llama (llama2 vocab 32,000, hidden 64, 2 layers, tied
embeddings, seed-0 init saved once and loaded by every run), fp32. Attention: HF `sdpa` (its
default; padded batches need no more); ours its default `--attn_implementation auto`, which on
this CPU is `sdpa_varlen` (micro-batch flattened into one row, SDPA per document).
Every side: AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, no weight decay), cosine schedule without
warmup over `--steps` optimizer steps, gradient clipping 1.0, 1 process, `--threads` torch threads,
no eval, no saving inside the loop.
  (a) ours, packed: `python trainer/train.py` (1 process, no launcher) on the --merge_data
      dataset, micro-batch 1 packed
      sample, accumulation 1 (one 2048-token row holds ~8.7 documents: the global batch in
      documents is the packed rows' document count, reported below). The loss is the trainer's
      default fused head (`--fused_loss`, trainer/loss.py).
  (a0) the same as (a) with `--no-fused_loss --attn_implementation sdpa` (loss from the full
      logits, dense block-diagonal mask: the trainer before those two changes): the
      before/after, in the same run.
  (b) ours, unpacked: the same command on the dataset without --merge_data, micro-batch 4,
      accumulation 2 = 8 documents per optimizer step; with sdpa_varlen each micro-batch is
      flattened into one row (no padding), so "unpacked" differs from (a) only in how many
      documents a step holds and in the shorter rows.
  (c) HF: `transformers.Trainer` + `DataCollatorForSeq2Seq(padding=True)`, micro-batch 4,
      accumulation 2, `optim="adamw_torch"`. Its samples are built from the unpacked shards via
      `shardfmt.open_dataset` (input_ids; labels = input_ids where loss_mask else -100) and fed in
      exactly the order (b) reads them (our GlobalSampler order, SequentialSampler in HF), so (b)
      and (c) see identical micro-batches and identical padding.
Our runs are a fresh `python trainer/train.py ARGV` subprocess each (default `--subprocess`;
`--no-subprocess` would reuse one process via `main(argv)` but DeepSpeed keeps the first run's
destroyed process group, so it fails on the second run). HF runs in one worker process (fresh
model and Trainer per run). Trainer defaults otherwise: ours uses DeepSpeed ZeRO-2 (its CPU default) and DataLoader
num_workers 1; HF uses num_workers 0.

How the numbers are computed (training loop only; start-up, model load and the final save are
excluded). Step 1 is a warm-up and is excluded everywhere; timed = steps 2..N.
  * ours: train_log.jsonl with --logging_steps 1 gives, per step, `loss_tokens_per_device` (the
    step's loss tokens) and `tokens_per_sec_per_device` = step tokens / step time, where step
    time is the trainer's own timer around fetching the micro-batches + forward/backward/step.
    Step tokens are recomputed from the sampler order (the same GlobalSampler/seed the trainer
    uses; checked against the log's loss-token counts), so step time = step tokens / that rate.
  * HF: a TrainerCallback records perf_counter at every on_step_end; timed = end of step N minus
    end of step 1 (so it includes fetching and collating the batches, like ours). Loss tokens =
    labels[:, 1:] != -100 counted in the collator, for the micro-batches of steps 2..N.
  * loss tokens/s = loss (answer) tokens of the timed steps / timed seconds. Medians of
    `--repeats` runs, sides interleaved within each repeat.
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
sys.path.insert(0, str(ROOT / "bench"))

from data_pipeline import SHARED, ensure_datasets, ensure_model, set_threads  # noqa: E402

LR, BETAS, EPS, CLIP, SEED = 1e-4, (0.9, 0.95), 1e-8, 1.0, 1234
CASES = {  # name: (dataset, micro-batch, accumulation)
    "ours_packed": ("alpaca_packed", 1, 1),
    "ours_packed_logits": ("alpaca_packed", 1, 1),
    "ours_unpacked": ("alpaca_unpacked", 4, 2),
    "hf": ("alpaca_unpacked", 4, 2),
}


def step_plan(data_dir: Path, micro: int, gas: int, steps: int, flatten: bool) -> list[dict]:
    """Per optimizer step: the documents, tokens and loss tokens our trainer reads (sampler order)."""
    from shardfmt import GlobalSampler, open_dataset
    from trainer.data import collate, count_loss_tokens
    ds = open_dataset(data_dir)
    order = GlobalSampler(len(ds), seed=SEED, shuffle=True).indices(range(steps * micro * gas))
    plan = []
    for s in range(steps):
        docs = tokens = loss = padded = 0
        for m in range(gas):
            k = (s * gas + m) * micro
            samples = [ds[int(i)] for i in order[k:k + micro]]
            batch = collate(samples, pad_id=0, flatten=flatten)
            docs += sum(len(x.doc_lens) for x in samples)
            tokens += batch["num_tokens"]
            loss += count_loss_tokens(batch)
            padded += batch["input_ids"].numel()
        plan.append({"docs": docs, "tokens": tokens, "loss_tokens": loss, "padded": padded})
    return plan


def run_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# -- ours -----------------------------------------------------------------------------------------
# (a0): the trainer as it was before the fused head and sdpa_varlen (full logits, 4D-mask sdpa)
EXTRA_FLAGS = {"ours_packed_logits": ["--no-fused_loss", "--attn_implementation", "sdpa"]}


def ours_argv(case: str, data: Path, model: Path, out: Path, steps: int) -> list[str]:
    _, micro, gas = CASES[case]
    return ["--model_path", str(model), "--data_path", str(data), "--output_path", str(out),
            "--save_name", case, "--no_timestamp", "--max_steps", str(steps),
            "--micro_batch_size", str(micro), "--gradient_accumulation_steps", str(gas),
            "--learning_rate", str(LR), "--lr_scheduler", "cosine", "--warmup_ratio", "0",
            "--weight_decay", "0", "--max_grad_norm", str(CLIP), "--optimizer", "adamw",
            "--precision", "fp32", "--seed", str(SEED),
            "--logging_steps", "1", *EXTRA_FLAGS.get(case, [])]


def ours_worker(args) -> None:
    """Runs `trainer.train.main(argv)` once per stdin line: the code `python trainer/train.py`
    runs, in one long-lived process so the ~30 s of imports are paid once, not per run."""
    import gc

    import matplotlib  # noqa: F401  (the final save plots the loss curve; import it up front)
    import trainer.train as tt
    from trainer.dist import init_distributed  # noqa: F401  (imports deepspeed)
    print("READY", flush=True)
    for line in sys.stdin:
        argv = json.loads(line)
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)  # a fresh 1-process group (new port) per run
        import deepspeed.comm.comm as ds_comm
        ds_comm.cdb = None  # main() destroyed the last group; DeepSpeed must not reuse its handle
        t0 = time.perf_counter()
        rc = tt.main(argv)
        wall = time.perf_counter() - t0
        gc.collect()
        print("RESULT " + json.dumps({"rc": rc, "wall": wall}), flush=True)


def run_ours(worker: "Worker", case: str, data: Path, model: Path, out: Path, args,
             plan: list[dict]) -> dict:
    run_dir = out / case
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.subprocess:  # exactly `python trainer/train.py ...`, a fresh process per run
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, str(ROOT / "trainer" / "train.py")]
                             + ours_argv(case, data, model, out, args.steps), cwd=ROOT,
                             env=run_env(args.threads), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"{case}: exit {res.returncode}\n{res.stderr[-4000:]}")
    else:
        r = worker.run(ours_argv(case, data, model, out, args.steps))
        if r["rc"] != 0:
            raise RuntimeError(f"{case}: trainer main() returned {r['rc']}; see the worker log")
        wall = r["wall"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    log = [r for r in log if "tokens_per_sec_per_device" in r]
    assert [r["step"] for r in log] == list(range(1, args.steps + 1)), log
    for r, p in zip(log, plan):
        if round(r["loss_tokens_per_device"]) != p["loss_tokens"]:
            raise RuntimeError(f"{case}: step {r['step']} logged {r['loss_tokens_per_device']} loss "
                               f"tokens, the sampler plan says {p['loss_tokens']}")
    step_s = [p["tokens"] / r["tokens_per_sec_per_device"] for r, p in zip(log, plan)]
    shutil.rmtree(run_dir, ignore_errors=True)  # the final checkpoint is not needed
    return summarise(sum(step_s[1:]), plan[1:], wall, first_step_s=step_s[0],
                     final_loss=log[-1]["loss"])


def summarise(seconds: float, timed: list[dict], wall: float, **extra) -> dict:
    loss = sum(p["loss_tokens"] for p in timed)
    tokens = sum(p["tokens"] for p in timed)
    return {"loop_s": seconds, "loss_tokens_per_s": loss / seconds, "tokens_per_s": tokens / seconds,
            "steps_per_s": len(timed) / seconds, "loss_tokens": loss, "tokens": tokens,
            "docs_per_step": sum(p["docs"] for p in timed) / len(timed),
            "fill": tokens / sum(p["padded"] for p in timed), "process_wall_s": wall, **extra}


# -- HF (runs in a worker process: `--_worker hf`, one line per run on stdin/stdout) --- --------------
def hf_worker(args) -> None:
    import numpy as np
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from shardfmt import GlobalSampler, open_dataset
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data, model_dir = out / CASES["hf"][0], out / "tiny_llama"
    _, micro, gas = CASES["hf"]
    ds = open_dataset(data)
    order = GlobalSampler(len(ds), seed=SEED, shuffle=True).indices(
        range(args.steps * micro * gas)).tolist()
    cols = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in order:  # our sampler's order; HF then reads it sequentially
        s = ds[i]
        ids = np.asarray(s.input_ids).astype(np.int64)
        cols["input_ids"].append(ids.tolist())
        cols["attention_mask"].append([1] * len(ids))
        cols["labels"].append(np.where(np.asarray(s.loss_mask, bool), ids, -100).tolist())
    train_ds = Dataset.from_dict(cols)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.pad_token = tok.unk_token  # id 0, the pad id our trainer uses for llama2
    base = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    counts: list[tuple[int, int, int]] = []

    def collator(features):
        batch = base(features)
        counts.append((int((batch["labels"][:, 1:] != -100).sum()),
                       int(batch["attention_mask"].sum()), int(batch["input_ids"].numel())))
        return batch

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, a, state, control, **kw):
            self.ends.append(time.perf_counter())

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    print("READY", flush=True)
    for _ in sys.stdin:
        counts.clear()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="sdpa")
        model.config.use_cache = False
        targs = TrainingArguments(
            output_dir=str(out / "hf_run"), per_device_train_batch_size=micro,
            gradient_accumulation_steps=gas, max_steps=args.steps, learning_rate=LR,
            lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, adam_beta1=BETAS[0],
            adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=CLIP, optim="adamw_torch",
            save_strategy="no", eval_strategy="no", report_to=[], logging_steps=args.steps,
            disable_tqdm=True, dataloader_num_workers=0, seed=SEED, use_cpu=True,
            bf16=False, fp16=False)
        timer = Timer()
        trainer = OrderedTrainer(model=model, args=targs, train_dataset=train_ds,
                                 data_collator=collator, callbacks=[timer])
        t0 = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - t0
        assert len(timer.ends) == args.steps and len(counts) == args.steps * gas, (timer.ends, counts)
        plan = [{"docs": micro * gas,
                 "loss_tokens": sum(c[0] for c in counts[s * gas:(s + 1) * gas]),
                 "tokens": sum(c[1] for c in counts[s * gas:(s + 1) * gas]),
                 "padded": sum(c[2] for c in counts[s * gas:(s + 1) * gas])}
                for s in range(args.steps)]
        res = summarise(timer.ends[-1] - timer.ends[0], plan[1:], wall,
                        first_step_s=timer.ends[0] - t0, final_loss=result.training_loss,
                        train_runtime=result.metrics.get("train_runtime"))
        print("RESULT " + json.dumps(res), flush=True)
        del trainer, model


class Worker:
    """A `--_worker KIND` process: one JSON line in per run, one `RESULT {...}` line out."""

    def __init__(self, kind: str, args):
        cmd = [sys.executable, __file__, "--_worker", kind, "--steps", str(args.steps),
               "--threads", str(args.threads), "--out", args.out]
        self.log = open(Path(args.out) / f"{kind}_worker.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(args.threads), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def ready(self) -> "Worker":
        self._read("READY")
        return self

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"HF worker exited (exit {self.proc.wait()}); see its log")

    def run(self, request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (step 1 untimed; "
                    "the full-logits paths (a0) and (c) run ~1.7x slower in steps 1-2 than from "
                    "step 3 on, so fewer steps would favour ours)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before_repeats", type=int, default=1,
                    help="runs of (a0), the reference for the before/after (in the first repeats)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared machine)")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "pipeline"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--subprocess", action=argparse.BooleanOptionalAction, default=True,
                    help="run our trainer as a fresh `python trainer/train.py` per run (~30 s of "
                    "imports each); --no-subprocess reuses one worker process, which does not work "
                    "yet: DeepSpeed keeps the destroyed process group of the first run")
    ap.add_argument("--_worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args._worker:
        (ours_worker if args._worker == "ours" else hf_worker)(args)
        return
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is not timed)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_datasets(out, Path(args.shared))
    model = ensure_model(out, Path(args.shared))
    plans = {c: step_plan(data[d], m, g, args.steps, flatten=c not in EXTRA_FLAGS)  # sdpa_varlen
             for c, (d, m, g) in CASES.items() if c != "hf"}
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    workers = {"hf": Worker("hf", args)}  # start-ups overlap; nothing is timed yet
    if not args.subprocess:
        workers["ours"] = Worker("ours", args)
    try:
        for w in workers.values():
            w.ready()
        for r in range(args.repeats):
            for case in CASES:
                if case in EXTRA_FLAGS and r >= args.before_repeats:
                    continue
                if case == "hf":
                    runs[case].append(workers["hf"].run(r))
                else:
                    runs[case].append(run_ours(workers.get("ours"), case, data[CASES[case][0]],
                                               model, out / "runs", args, plans[case]))
                print(f"repeat {r} {case}: {runs[case][-1]['loss_tokens_per_s']:,.0f} loss tok/s",
                      file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
    med = {c: {k: statistics.median(x[k] for x in v) for k in v[0]
               if isinstance(v[0][k], (int, float))} for c, v in runs.items()}
    hf_rate = med["hf"]["loss_tokens_per_s"]
    labels = {"ours_packed": "(a) ours, packed (mb 1 × gas 1)",
              "ours_packed_logits": "(a0) ours before: (a) with `--no-fused_loss --attn_implementation sdpa` "
                                    f"({min(args.before_repeats, args.repeats)} run)",
              "ours_unpacked": "(b) ours, unpacked (mb 4 × gas 2)",
              "hf": "(c) HF Trainer + DataCollatorForSeq2Seq (mb 4 × gas 2)"}
    targets = {"ours_packed": 2.0, "ours_unpacked": 1.0}
    print(f"tiny Llama (vocab 32000, hidden 64, 2 layers), fp32, CPU, {args.threads} torch "
          f"thread(s); {args.steps} optimizer steps per run, steps 2..{args.steps} timed; medians "
          f"of {args.repeats} runs ((a0): {min(args.before_repeats, args.repeats)})\n")
    print("| method | docs/step | fill (real/padded tokens) | loss tokens/s | real tokens/s | "
          "s/step | vs (c) | target |\n|---|---|---|---|---|---|---|---|")
    for case, m in med.items():
        ratio = m["loss_tokens_per_s"] / hf_rate
        target = targets.get(case)
        verdict = "" if target is None else (f"≥ {target:g}× " + ("met" if ratio >= target else
                                                                    "**missed**"))
        print(f"| {labels[case]} | {m['docs_per_step']:.1f} | {m['fill']:.1%} | "
              f"{m['loss_tokens_per_s']:,.0f} | {m['tokens_per_s']:,.0f} | "
              f"{1 / m['steps_per_s']:.2f} | {ratio:.2f}× | {verdict} |")
    gain = med["ours_packed"]["loss_tokens_per_s"] / med["ours_packed_logits"]["loss_tokens_per_s"]
    print(f"\n(a) ÷ (a0), before / after the fused head + sdpa_varlen: **{gain:.2f}×**")
    print("\nloss tokens/s = answer tokens of steps 2..N / their wall time (ours: sum of the "
          "trainer's per-step timer; HF: on_step_end(N) − on_step_end(1)). fill = real tokens / "
          "tokens in the padded micro-batches (what the model computes on).\n\n"
          "(a0) is (a) as the trainer ran before the fused head and sdpa_varlen: the loss from the full B×L×V "
          "logits and SDPA with a dense 2048×2048 block-diagonal mask. (a) ÷ (a0) is the gain of "
          "the fused head (`trainer/loss.py`: output layer + cross-entropy chunk by chunk, on "
          "labelled positions only) plus `sdpa_varlen` (`trainer/attention.py`: SDPA per "
          "document, no mask). fill for (b): sdpa_varlen flattens each micro-batch into one row, "
          "so ours computes on no padding; HF pads to the longest document.")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "runs": runs, "cases": CASES,
                                               "steps": args.steps, "threads": args.threads},
                                              indent=2))


if __name__ == "__main__":
    main()
