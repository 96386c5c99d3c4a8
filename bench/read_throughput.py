"""Read throughput: shardfmt's `open_dataset` vs megatron-core's `IndexedDataset`, same tokens.

    .venv/bin/python bench/read_throughput.py --gb 1.0 --repeats 3

Builds (once, cached under bench_out/) a dataset of `--gb` GB of uint16 tokens in samples of 512-4096
tokens, written both by our ShardWriter and by megatron-core's IndexedDatasetBuilder. Then, each
in a fresh subprocess (so peak RSS is its own), measures:
  * random access: samples/s over `--reads` uniformly random indices. Ours returns the full sample
    (tokens + loss mask + doc lengths); Megatron returns tokens only.
  * sequential: tokens/s reading every sample in order (one token per 512 summed, so every page
    is really read).
  Both are measured twice: in each side's own process (with the rest below), and interleaved —
  both datasets open in one process (after 20k untimed warm-up reads each), the reads split into
  `--blocks` blocks that alternate ours/megatron (which goes first alternates too). This VM's
  speed drifts by up to 2x between processes a minute apart, so only the interleaved ratios are
  steady from run to run; they are the ones to read.
  * peak RSS (ru_maxrss) and the process's anonymous (non-file) RSS at the end: file pages of an
    mmap count in RSS while cached but are reclaimable; anonymous memory is what a reader owns.
  * the time to open a dataset of 1,000 shards.
Medians of `--repeats` runs, and ours/megatron ratios, are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardfmt import ShardWriter, open_dataset  # noqa: E402


def build(out: Path, gb: float) -> tuple[Path, Path]:
    """Write the same random token samples in both formats (cached by size)."""
    ours, prefix = out / f"ours_{gb}" / "bench", out / f"megatron_{gb}" / "bench"
    if (ours / "manifest.json").exists() and prefix.with_suffix(".idx").exists():
        return ours, prefix
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import torch
    rng = np.random.default_rng(0)
    target = int(gb * 1e9 / 2)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    with ShardWriter(ours.parent, "bench", dtype="uint16", encode_type="pretrain",
                     max_length=4096, tokenizer_info={"len": 65536},
                     tokens_per_file=250_000_000, overwrite=True) as w:
        written = 0
        while written < target:
            n = int(rng.integers(512, 4097))
            ids = rng.integers(0, 65536, n, dtype=np.uint16)
            w.add_sample([(ids, np.ones(n, bool))])
            builder.add_document(torch.from_numpy(ids.astype(np.int64)), [n])
            written += n
    builder.finalize(str(prefix) + ".idx")
    return ours, prefix


def _anon_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(kind: str, path: str, reads: int) -> dict:
    """One measurement in this process: open, random reads, sequential scan, RSS."""
    if kind == "megatron":  # import outside the timed region (it pulls in torch)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    t0 = time.perf_counter()
    ds = open_dataset(path) if kind == "ours" else IndexedDataset(path)
    ds[0]  # open = until a sample can be read: ours maps and checks a shard's index lazily
    open_s = time.perf_counter() - t0
    n = len(ds)
    idx = np.random.default_rng(1).integers(0, n, reads).tolist()
    t0 = time.perf_counter()
    for i in idx:
        ds[i]
    random_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        s = ds[i]
        total += _touch(kind, s)
    seq_s = time.perf_counter() - t0
    tokens = ds.num_tokens if kind == "ours" else int(ds.sequence_lengths.sum())
    return {"open_s": open_s, "random_samples_per_s": reads / random_s,
            "seq_tokens_per_s": tokens / seq_s, "seq_samples_per_s": n / seq_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "anon_rss_mb": _anon_rss_mb(), "samples": n, "tokens": tokens}


def _touch(name: str, sample) -> int:
    """Read one token per 512 (every page of the sample): what a sequential scan pays for."""
    return int((sample.input_ids if name == "ours" else sample)[::512].sum())


def interleaved(ours_path: str, megatron_path: str, reads: int, blocks: int) -> dict:
    """Both datasets in one process, in alternating blocks (which side goes first alternates too):
    random reads (samples/s) and a sequential scan (tokens/s; contiguous sample ranges) per side."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    sides = {"ours": open_dataset(ours_path), "megatron": IndexedDataset(megatron_path)}
    n = len(sides["ours"])
    assert n == len(sides["megatron"]), (n, len(sides["megatron"]))
    idx = np.random.default_rng(2).integers(0, n, reads).tolist()
    for ds in sides.values():  # warm-up, untimed: maps the files and faults the index pages in
        for i in idx[:20_000]:
            ds[i]
    rnd = {"ours": 0.0, "megatron": 0.0}
    seq = {"ours": 0.0, "megatron": 0.0}
    step = max(1, reads // blocks)
    ranges = np.linspace(0, n, blocks + 1).astype(int).tolist()
    for b in range(blocks):
        order = ("ours", "megatron") if b % 2 == 0 else ("megatron", "ours")
        for name in order:
            ds = sides[name]
            t0 = time.perf_counter()
            for i in idx[b * step:(b + 1) * step]:
                ds[i]
            rnd[name] += time.perf_counter() - t0
        for name in order:
            ds = sides[name]
            t0 = time.perf_counter()
            for i in range(ranges[b], ranges[b + 1]):
                _touch(name, ds[i])
            seq[name] += time.perf_counter() - t0
    tokens = sides["ours"].num_tokens
    return {name: {"random": blocks * step / rnd[name], "sequential": tokens / seq[name]}
            for name in sides}


def open_many_shards(out: Path, shards: int = 1000) -> float:
    d = out / f"many_{shards}" / "many"
    if not (d / "manifest.json").exists():
        with ShardWriter(d.parent, "many", dtype="uint16", encode_type="pretrain", max_length=64,
                         tokenizer_info={"len": 100}, tokens_per_file=64, overwrite=True) as w:
            for _ in range(shards):
                w.add_sample([(np.arange(64, dtype=np.uint16), np.ones(64, bool))])
    t0 = time.perf_counter()
    ds = open_dataset(d)
    elapsed = time.perf_counter() - t0
    assert ds.num_shards == shards
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="dataset size in GB of tokens")
    ap.add_argument("--reads", type=int, default=100_000, help="random reads per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench_out"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--blocks", type=int, default=20, help="alternating blocks (interleaved reads)")
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_interleaved", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure[0], args._measure[1], args.reads)))
        return
    if args._interleaved:
        print(json.dumps(interleaved(*args._interleaved, args.reads, args.blocks)))
        return
    out = Path(args.out)
    ours, prefix = build(out, args.gb)
    runs: dict[str, list[dict]] = {"ours": [], "megatron": []}
    for _ in range(args.repeats):
        for kind, path in (("ours", ours), ("megatron", prefix)):
            res = subprocess.run([sys.executable, __file__, "--reads", str(args.reads),
                                  "--_measure", kind, str(path)],
                                 capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
        res = subprocess.run([sys.executable, __file__, "--reads", str(args.reads), "--blocks",
                              str(args.blocks), "--_interleaved", str(ours), str(prefix)],
                             capture_output=True, text=True, check=True)
        both = json.loads(res.stdout.strip().splitlines()[-1])
        for kind in runs:
            runs[kind][-1]["interleaved_random_samples_per_s"] = both[kind]["random"]
            runs[kind][-1]["interleaved_seq_tokens_per_s"] = both[kind]["sequential"]
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    open_1000 = statistics.median(open_many_shards(out) for _ in range(args.repeats))
    o, g = med["ours"], med["megatron"]
    print(f"dataset: {o['tokens'] / 1e6:.0f}M uint16 tokens ({o['tokens'] * 2 / 1e9:.2f} GB), "
          f"{o['samples']} samples; medians of {args.repeats} runs, warm page cache\n")
    print("| metric | shardfmt | megatron-core | ratio |\n|---|---|---|---|")
    for key, label in (("interleaved_random_samples_per_s",
                        "**random reads, interleaved in one process (samples/s)**"),
                       ("interleaved_seq_tokens_per_s",
                        "**sequential scan, interleaved in one process (tokens/s)**"),
                       ("random_samples_per_s", "random reads, each side in its own process"),
                       ("seq_tokens_per_s", "sequential scan, each side in its own process"),
                       ("open_s", "open + first read (s)"), ("peak_rss_mb", "peak RSS (MB)"),
                       ("anon_rss_mb", "anonymous RSS at end (MB)")):
        print(f"| {label} | {o[key]:,.4g} | {g[key]:,.4g} | {o[key] / g[key]:.2f} |")
    print(f"\nopen 1,000 shards: {open_1000:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "open_1000_shards_s": open_1000,
                                               "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
