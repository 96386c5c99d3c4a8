"""What the "data text never yields a control token" guard costs (encoder/document_encoder.py).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/special_token_guard.py [--tokenizers qwen3,llama3,llama2]

On ~4 MB of ../shared text (the Chinese novel, tinyshakespeare, wiki lines) encoded by gigatoken,
per tokenizer: how many control ids it guards (BOS/EOS/pad/unk + every added token marked special),
the id-table lookup the guard runs per batch vs np.isin over the same ids (best of 7), and the
whole guarded encode for scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
FILES = ("zh_xiyouji.txt", "tinyshakespeare.txt", "wiki_demo.txt")


def best_of(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(name: str, texts: list[str]) -> str:
    from encoder.document_encoder import DocumentEncoder, EncoderSpec
    enc = DocumentEncoder(EncoderSpec(str(SHARED / "tokenizers" / name), "pretrain", 2048,
                                      tokenizer_backend="gigatoken"))
    enc.select_backend(texts[:100])
    flat = enc.engine.encode(texts).flat
    ids = np.array(sorted(enc.control_ids))
    table = best_of(lambda: enc._control_table.take(flat, mode="clip"))
    isin = best_of(lambda: np.isin(flat, ids))
    t = time.perf_counter()
    enc._encode_texts(texts, enc.engine, guard=True)
    whole = time.perf_counter() - t
    return (f"| {name} | {len(flat):,} | {len(ids)} | {table * 1e3:.2f} ms | {isin * 1e3:.2f} ms "
            f"| {whole:.3f} s |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", default="qwen3,llama3,llama2")
    args = ap.parse_args()
    texts = [line for f in FILES
             for line in (SHARED / "data" / f).read_text(encoding="utf-8").split("\n") if line]
    print("| tokenizer | tokens | control ids | guard: id table | np.isin | whole guarded encode |")
    print("|---|---|---|---|---|---|")
    for name in args.tokenizers.split(","):
        print(measure(name, texts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
