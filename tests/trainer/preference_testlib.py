"""Tiny preference datasets for the trainer tests: prompt = a run of counting words, chosen = the
run continued, rejected = the same length of shuffled words (learnable in a few steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer_testlib import NUM_WORDS


def make_pairs(num_pairs: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(chosen ids, rejected ids, prompt length) per pair; BOS first, EOS ends each response."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(num_pairs):
        start, p, r = int(rng.integers(0, NUM_WORDS)), int(rng.integers(3, 9)), int(rng.integers(3, 8))
        prompt = 4 + (start + np.arange(p)) % NUM_WORDS
        good = 4 + (start + p + np.arange(r)) % NUM_WORDS
        bad = 4 + rng.integers(0, NUM_WORDS, size=int(rng.integers(3, 8)))
        chosen = np.concatenate([[1], prompt, good, [2]])
        rejected = np.concatenate([[1], prompt, bad, [2]])
        pairs.append((chosen, rejected, 1 + p))
    return pairs


def write_pairs(out_dir: Path, name: str, tokenizer, pairs, *, per_sample: int = 1,
                seq_max: int = 32) -> Path:
    """A preference dataset: `per_sample` consecutive pairs in each sample (1 = unpacked)."""
    from shardfmt import ShardWriter, tokenizer_identity
    from shardfmt.preference import preference_manifest_entry
    with ShardWriter(out_dir, name, dtype="uint16", encode_type="preference",
                     max_length=2 * seq_max * per_sample, tokenizer_info=tokenizer_identity(tokenizer),
                     packing="bfd" if per_sample > 1 else "none", overwrite=True,
                     manifest_extra={"preference": preference_manifest_entry(
                         sequence_max_length=seq_max, pairs=len(pairs))}) as w:
        for k in range(0, len(pairs), per_sample):
            docs = []
            for chosen, rejected, p in pairs[k:k + per_sample]:
                for ids in (chosen, rejected):
                    mask = np.zeros(len(ids), bool)
                    mask[p:] = True
                    docs.append((ids, mask))
            w.add_sample(docs)
    return out_dir / name
