"""Packing fill: encoder/packing.py vs no packing, greedy first-fit and the original tool's heap.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/packing_fill.py

Lengths are computed by the encoder itself (`DocumentEncoder.encode_rows`, llama2, no truncation):
  * alpaca: alpaca_en_demo + alpaca_zh_demo through encoder/user_data_loader/alpaca.py,
    --encode_type qa, --template none: BOS + prompt + answer + EOS.
  * sharegpt: fastchat_dummy_conversation.json through sharegpt.py, --encode_type chat,
    --template llama2 (llama2 has no chat_template): BOS + the whole conversation.
Methods, at each max_length (fill = tokens / (sequences × max_length)):
  * ours: `best_fit_decreasing` + `drain_sparsest`, exactly what `--merge_data` runs per window.
  * ours, BFD only: `best_fit_decreasing` without the drain pass (for reference).
  * no packing: one sample per sequence.
  * first-fit: each sample, in input order, into the first open sequence with room.
  * original heap (llm-lite-trainer encode_qa.py): a min-heap of sequences keyed by length; pop
    the shortest, append the sample if it fits, else push it back and open a new sequence.
Samples longer than max_length are excluded from every method and counted. Deterministic: one run.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoder.packing import best_fit_decreasing, drain_sparsest  # noqa: E402

SHARED = ROOT.parent / "shared"
DATASETS = {
    "alpaca": ("alpaca.py", "qa", "none", ["alpaca_en_demo.json", "alpaca_zh_demo.json"]),
    "sharegpt": ("sharegpt.py", "chat", "llama2", ["fastchat_dummy_conversation.json"]),
}


def encoder_lengths(name: str, shared: Path, tokenizer: str) -> list[int]:
    """Document lengths exactly as the encoder computes them (pre-truncation raw_len)."""
    from encoder.plugins import check_row, load_plugin
    from encoder.document_encoder import DocumentEncoder, EncoderSpec
    plugin, encode_type, template, files = DATASETS[name]
    rows = load_plugin(str(ROOT / "encoder" / "user_data_loader" / plugin)).fn(
        path=",".join(str(shared / "data" / f) for f in files))
    norm = [check_row(r, encode_type=encode_type) for r in rows]
    enc = DocumentEncoder(EncoderSpec(str(shared / "tokenizers" / tokenizer), encode_type,
                                    max_length=10**9, template=template))
    out = enc.encode_rows(norm)
    bad = [e.reason for e in out if e.status != "ok"]
    if bad:
        raise RuntimeError(f"{name}: {len(bad)} rows not encoded: {bad[:3]}")
    return [e.raw_len for e in out]


# -- methods: each returns a list of bins (lists of item indices) ---------------------------------
def ours(lengths: list[int], cap: int) -> list[list[int]]:
    return drain_sparsest(best_fit_decreasing(lengths, capacity=cap), lengths, capacity=cap)


def ours_bfd_only(lengths: list[int], cap: int) -> list[list[int]]:
    return best_fit_decreasing(lengths, capacity=cap)


def no_packing(lengths: list[int], cap: int) -> list[list[int]]:
    return [[i] for i in range(len(lengths))]


def first_fit(lengths: list[int], cap: int) -> list[list[int]]:
    bins: list[list[int]] = []
    loads: list[int] = []
    for i, n in enumerate(lengths):
        for b, load in enumerate(loads):
            if load + n <= cap:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return bins


def original_heap(lengths: list[int], cap: int) -> list[list[int]]:
    heap: list[tuple[int, int, list[int]]] = []   # (length, creation order, items)
    for i, n in enumerate(lengths):
        if heap:
            load, k, items = heapq.heappop(heap)
            if load + n <= cap:
                items.append(i)
                heapq.heappush(heap, (load + n, k, items))
                continue
            heapq.heappush(heap, (load, k, items))
        heapq.heappush(heap, (n, len(heap), [i]))
    return [items for _, _, items in heap]


METHODS = [("ours (BFD + drain_sparsest)", ours), ("ours, BFD only", ours_bfd_only),
           ("no packing", no_packing), ("greedy first-fit (input order)", first_fit),
           ("original heap (pop shortest)", original_heap)]


def check(bins: list[list[int]], lengths: list[int], cap: int) -> None:
    items = sorted(i for b in bins for i in b)
    assert items == list(range(len(lengths))), "a method lost or duplicated a sample"
    assert all(sum(lengths[i] for i in b) <= cap for b in bins), "a sequence overflows"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max_lengths", default="512,2048,4096")
    ap.add_argument("--tokenizer", default="llama2")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = Path(args.shared)
    if not (shared / "tokenizers" / args.tokenizer).is_dir():
        print(f"skip: {shared}/tokenizers/{args.tokenizer} not found (needs ../shared)")
        return
    caps = [int(x) for x in args.max_lengths.split(",")]
    results: dict = {}
    target_line = None
    for name in DATASETS:
        all_lengths = encoder_lengths(name, shared, args.tokenizer)
        print(f"### {name}: {len(all_lengths)} samples, {sum(all_lengths):,} tokens "
              f"({args.tokenizer}; length min {min(all_lengths)}, max {max(all_lengths)})\n")
        print("| max_length | excluded (> max_length) | lower bound: sequences (max fill) | "
              "method | sequences | fill | time |\n|---|---|---|---|---|---|---|")
        for cap in caps:
            lengths = [n for n in all_lengths if n <= cap]
            excluded = len(all_lengths) - len(lengths)
            total = sum(lengths)
            bound = -(-total // cap)
            for label, fn in METHODS:
                t0 = time.perf_counter()
                bins = fn(lengths, cap)
                dt = time.perf_counter() - t0
                check(bins, lengths, cap)
                fill = total / (len(bins) * cap)
                results.setdefault(name, {}).setdefault(str(cap), {})[label] = {
                    "sequences": len(bins), "fill": fill, "seconds": dt, "excluded": excluded,
                    "lower_bound": bound, "tokens": total}
                print(f"| {cap} | {excluded} | {bound} ({100 * total / (bound * cap):.2f}%) | "
                      f"{label} | {len(bins)} | {100 * fill:.2f}% | {dt * 1e3:.0f} ms |")
            if name == "alpaca" and cap == 2048:
                f = results[name]["2048"][METHODS[0][0]]["fill"]
                target_line = (f"target ≥ 99.5% fill at 2048 on alpaca: {100 * f:.2f}% — "
                               f"{'met' if f >= 0.995 else 'MISSED'}")
        print()
    if target_line:
        print(target_line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
