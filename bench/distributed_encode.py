"""Distributed encode: parts/s and tokens/s of `python -m encoder.distributed` on a 2-node local
Ray cluster (head + a second node, 1 CPU each, 127.0.0.1 only) next to one `encoder/main.py`
process on the same corpus.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/distributed_encode.py [--copies 6] [--num_parts 4]

Corpus: c4_demo.jsonl + wiki_demo.txt (line mode), `--copies` distinct copies (every copy's text
is changed slightly, so the tokenizer's cache does not serve repeats) as JSONL, pretrain, gpt2
tokenizer, max_length 2048 -- the text.py plugin, which reads only its part's byte range.
Times are wall clock of the whole command (interpreter start to merged output), so the Ray run
includes joining the cluster, starting workers and loading the tokenizer once per part;
"after start-up" is the encoder's own tokens/s for the single process (after its tokenizer load)
and, for Ray, the tokens over the time from joining the cluster to the last part's end (workers
start and load the tokenizer inside it).
Both runs write the same token stream (checked token by token). On a 2-core machine shared with other jobs the two
nodes compete for the same cores: this measures overhead and correctness of the distribution,
not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "encoder"))   # the loopback test cluster


def make_corpus(out: Path, copies: int) -> Path:
    """`copies` distinct copies of c4 + wiki lines as one JSONL file."""
    c4 = [json.loads(line)["text"] for line in (SHARED / "data" / "c4_demo.jsonl").open()]
    wiki = [ln for ln in (SHARED / "data" / "wiki_demo.txt").read_text().splitlines() if ln.strip()]
    path = out / "corpus.jsonl"
    with path.open("w") as f:
        for k in range(copies):
            for text in c4 + wiki:
                f.write(json.dumps({"text": f"[{k}] {text}"}) + "\n")
    return path


def encoder_flags(corpus: Path, out: Path) -> list[str]:
    return ["--tokenizer_path", str(SHARED / "tokenizers" / "gpt2"), "--data_loader_path",
            str(ROOT / "encoder" / "user_data_loader" / "text.py"), "--data_loader_args",
            f"path={corpus}", "--encode_type", "pretrain", "--max_length", "2048",
            "--output_path", str(out), "--corpus_name", "c"]


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return secs, res.stdout + res.stderr


def token_stream(dataset: Path):
    """Every token of the dataset in order (pretrain parts cut samples differently at part
    boundaries; the stream itself must be the same)."""
    import numpy as np
    from shardfmt import open_dataset
    ds = open_dataset(str(dataset))
    return np.concatenate([ds[i].input_ids for i in range(len(ds))])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=6)
    p.add_argument("--num_parts", type=int, default=4)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not (SHARED / "tokenizers" / "gpt2").is_dir():
        print(f"skipped: {SHARED} (real tokenizers and data) not found")
        return 0
    from ray_local_cluster import LocalRayCluster

    work = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    corpus = make_corpus(work, args.copies)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    rows = []
    secs, log = timed([sys.executable, "encoder/main.py", *encoder_flags(corpus, work / "one")], env)
    stream = token_stream(work / "one" / "c")
    tokens = len(stream)
    steady = float(re.search(r"\(([\d,]+) tok/s", log).group(1).replace(",", ""))
    rows.append({"run": "1 process (encoder/main.py)", "nodes": 1, "parts": 1, "seconds": secs,
                 "tokens": tokens, "parts_per_s": 1 / secs, "tokens_per_s": tokens / secs,
                 "steady_tokens_per_s": steady})
    cluster = LocalRayCluster(cpus_per_node=1)
    try:
        started = time.perf_counter()
        cluster.start()
        cluster_secs = time.perf_counter() - started
        cmd = [sys.executable, "-m", "encoder.distributed", "--engine", "ray", "--address",
               cluster.address, "--num_parts", str(args.num_parts),
               *encoder_flags(corpus, work / "ray")]
        secs, log = timed(cmd, {**cluster.env, **env})
    finally:
        cluster.stop()
    ray_stream = token_stream(work / "ray" / "c")
    ray_tokens = len(ray_stream)
    if ray_tokens != tokens or not (ray_stream == stream).all():
        raise SystemExit(f"the Ray run's tokens differ from the single process's ({ray_tokens} vs "
                         f"{tokens} tokens)")
    done = re.search(r"after start-up: ([\d.]+) s \(([\d.]+) parts/s, ([\d,]+) tokens/s\)", log)
    part_steady = float(done.group(3).replace(",", ""))
    rows.append({"run": f"Ray, 2 local nodes x 1 CPU, {args.num_parts} parts", "nodes": 2,
                 "parts": args.num_parts, "seconds": secs, "tokens": ray_tokens,
                 "parts_per_s": args.num_parts / secs, "tokens_per_s": ray_tokens / secs,
                 "steady_tokens_per_s": part_steady, "cluster_start_seconds": cluster_secs})
    print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB JSONL ({args.copies} copies of c4_demo + "
          f"wiki_demo), pretrain, gpt2, max_length 2048; {tokens:,} tokens\n")
    print("| run | wall s | parts/s | tokens/s (wall) | tokens/s (after start-up) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['parts_per_s']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['steady_tokens_per_s']:,.0f} |")
    print(f"\nstarting the 2-node cluster (not in the wall time): {cluster_secs:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
