"""Length statistics, the run summary, stats.json and the --plot histogram."""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardfmt.writer import open_atomic, write_text_atomic

MAX_REASONS = 5


def percentiles(lengths: list[int] | np.ndarray) -> dict:
    """min/p50/p90/p99/max/mean of `lengths` (all zeros when empty).

    >>> percentiles([1, 2, 3, 4])["p50"]
    2.5
    """
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.size == 0:
        return {"count": 0, "min": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0}
    p50, p90, p99 = (float(x) for x in np.percentile(arr, [50, 90, 99]))
    return {"count": int(arr.size), "min": int(arr.min()), "p50": p50, "p90": p90, "p99": p99,
            "max": int(arr.max()), "mean": round(float(arr.mean()), 2)}


WARN_LOSS_FRACTION = 0.01   # warn when more than 1% of documents are dropped or truncated
KEEP_FRACTION = 0.99        # suggested max_length keeps this fraction of documents whole


def length_keeping(lengths: list[int] | np.ndarray, fraction: float = KEEP_FRACTION) -> int:
    """The smallest max_length that keeps at least `fraction` of the documents whole (an order
    statistic, not an interpolated percentile, so it really keeps them).

    >>> length_keeping(list(range(1, 101)))
    99
    """
    arr = np.sort(np.asarray(lengths, dtype=np.int64))
    if arr.size == 0:
        return 0
    return int(arr[max(0, int(np.ceil(fraction * arr.size)) - 1)])


def truncation_warning(stats: dict, *, truncation: str, analyze: bool = False) -> str | None:
    """A warning when more than 1% of the documents lost tokens or were dropped (with --analyze:
    would be), else None."""
    docs = stats["doc_length"]["count"]
    lost = stats["dropped"] + stats["truncated"]
    if docs == 0 or lost <= WARN_LOSS_FRACTION * docs:
        return None
    verb = "would be " if analyze else ""
    what = f"{stats['dropped']} {verb}dropped" + (f", {stats['truncated']} {verb}truncated"
                                                 if stats["truncated"] else "")
    other = {"drop": "--truncation right (cut the end) or prompt_left (cut the prompt's start)",
             "right": "--truncation drop (skip them whole) or prompt_left",
             "prompt_left": "--truncation drop (skip them whole) or right"}.get(truncation, "")
    return (f"warning: {lost} of {docs} documents ({100 * lost / docs:.1f}%) are longer than "
            f"--max_length {stats['max_length']} ({what}, --truncation {truncation}); "
            f"--max_length {stats['max_length_keeping_99pct']} keeps 99% whole; or change the "
            f"policy with {other}")


@dataclass
class RunStats:
    """Counts gathered while encoding; `as_dict()` is what stats.json holds."""

    max_length: int
    # 4 bytes a document in a compact array (a list of ints costs ~36: 10M documents = 360 MB)
    doc_lengths: array = field(default_factory=lambda: array("i"))     # before truncation
    sample_lengths: array = field(default_factory=lambda: array("i"))  # written samples
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    remainder_tokens: int = 0
    remainder_dropped: bool = False
    tokens_per_shard: list[int] = field(default_factory=list)
    sample_capacity: int | None = None   # tokens a sample can hold, if not max_length (pairs: 2x)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < MAX_REASONS:
            self.skip_reasons.append(reason)

    def fill(self) -> float:
        """Tokens written / (samples * max_length)."""
        n = len(self.sample_lengths)
        total = np.frombuffer(self.sample_lengths, dtype=np.int32).sum(dtype=np.int64) if n else 0
        return float(total) / (n * (self.sample_capacity or self.max_length)) if n else 0.0

    def as_dict(self) -> dict:
        over = int(np.count_nonzero(np.frombuffer(self.doc_lengths, dtype=np.int32)
                                    > self.max_length)) if len(self.doc_lengths) else 0
        return {
            "rows": self.rows,
            "max_length": self.max_length,
            "max_length_keeping_99pct": length_keeping(self.doc_lengths),
            "doc_length": percentiles(self.doc_lengths),
            "docs_longer_than_max_length": over,
            "sample_length": percentiles(self.sample_lengths),
            "samples": len(self.sample_lengths),
            "tokens": int(np.frombuffer(self.sample_lengths, dtype=np.int32).sum(dtype=np.int64))
            if len(self.sample_lengths) else 0,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "skipped_invalid": self.skipped,
            "skip_reasons": self.skip_reasons,
            "fill": round(self.fill(), 6),
            "min_possible_samples": -(-int(np.frombuffer(self.sample_lengths, dtype=np.int32)
                                           .sum(dtype=np.int64)) // self.max_length)
            if len(self.sample_lengths) else 0,
            "final_remainder_tokens": self.remainder_tokens,
            "final_remainder_dropped": self.remainder_dropped,
            "tokens_per_shard": self.tokens_per_shard,
        }


def summary_lines(stats: dict, *, seconds: float | None = None) -> list[str]:
    """Human-readable summary of `RunStats.as_dict()`."""
    d, s = stats["doc_length"], stats["sample_length"]
    lines = [
        f"rows {stats['rows']}  samples {stats['samples']}  tokens {stats['tokens']}"
        + (f"  ({stats['tokens'] / seconds:,.0f} tok/s over {seconds:.1f}s)" if seconds else ""),
        f"document length  min {d['min']}  p50 {d['p50']:.0f}  p90 {d['p90']:.0f}  "
        f"p99 {d['p99']:.0f}  max {d['max']}  ({stats['docs_longer_than_max_length']} longer "
        f"than max_length)",
        f"sample length    min {s['min']}  p50 {s['p50']:.0f}  p90 {s['p90']:.0f}  "
        f"p99 {s['p99']:.0f}  max {s['max']}  fill {100 * stats['fill']:.2f}%",
        f"truncated {stats['truncated']}  dropped {stats['dropped']}  "
        f"skipped invalid {stats['skipped_invalid']}",
    ]
    if "max_length_keeping_99pct" in stats and d["count"]:
        lines.append(f"max_length keeping 99% of documents whole: "
                     f"{stats['max_length_keeping_99pct']} (now {stats.get('max_length')}: "
                     f"{stats['docs_longer_than_max_length']} of {d['count']} exceed it)")
    lines += [f"  skipped: {r}" for r in stats["skip_reasons"]]
    backend = stats.get("tokenizer_backend")
    if backend:
        lines.append(f"tokenizer backend {backend['name']} ({backend['reason']}); cross-check "
                     f"{backend['cross_check']}")
    if stats["final_remainder_tokens"]:
        verb = "dropped" if stats["final_remainder_dropped"] else "kept as a shorter last sample"
        lines.append(f"final remainder: {stats['final_remainder_tokens']} tokens ({verb})")
    return lines


def write_stats_json(path: Path, stats: dict) -> None:
    """Durably (shardfmt's write_text_atomic: 2 fsyncs), before the manifest marks the dataset
    complete."""
    write_text_atomic(path, json.dumps(stats, indent=2) + "\n")


def plot_lengths(path: Path, doc_lengths: list[int], *, max_length: int, title: str) -> None:
    """Histogram of document lengths with the max_length cut marked (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(doc_lengths, bins=min(100, max(10, len(set(doc_lengths)))), color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per document (before truncation)")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    try:
        with open_atomic(path, "wb") as f:  # durable before the manifest (2 fsyncs)
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
