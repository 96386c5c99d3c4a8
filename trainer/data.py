"""Batches from shardfmt datasets: per-rank sample streams, packing-aware collate, attention masks.

A packed sample holds several documents back to back. Attention must never cross them and the last
token of one document must never be trained to predict the first token of the next, so the collate
function emits, per token:

  input_ids     the tokens (pads: `pad_id`)
  labels        the token where it is a loss token, else -100; also -100 on pads and on the first
                token of every document segment (HF convention: labels[t] is predicted from t-1)
  position_ids  0, 1, ... restarting at every document
  segment_ids   document number inside the row (pads: -1, a segment of their own)

`attention_mask_4d` turns segment ids into a block-diagonal causal mask (bool for sdpa, 0/min float
for eager). flash_attention_2 and sdpa_varlen (trainer/attention.py) use `flatten=True` instead:
the whole micro-batch becomes one row with restarting position ids and no mask (varlen attention,
no padding; sdpa_varlen also gets the document boundaries as cu_seq_lens_q/k).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from shardfmt import ConcatDataset, GlobalSampler, Sample, TokenDataset, open_source
from shardfmt.mixing import BlendedSampler, parse_mix, source_names
from shardfmt.sampler import RankIterator
from trainer.attention import VARLEN_SDPA, document_bounds
from trainer.errors import UsageError

IGNORE_INDEX = -100
FLATTENED_ATTENTION = ("flash_attention_2", VARLEN_SDPA)  # one row per micro-batch, no padding


def sample_row(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One sample -> (input_ids int64, labels int64, position_ids int64, segment_ids int64)."""
    ids = np.asarray(sample.input_ids).astype(np.int64)
    doc_lens = np.asarray(sample.doc_lens, dtype=np.int64)
    labels = np.where(np.asarray(sample.loss_mask, dtype=bool), ids, IGNORE_INDEX)
    starts = np.concatenate(([0], np.cumsum(doc_lens)[:-1])) if len(doc_lens) else np.zeros(0, np.int64)
    labels[starts[starts < len(ids)]] = IGNORE_INDEX  # (an empty Megatron sequence has no first token)
    segment_ids = np.repeat(np.arange(len(doc_lens), dtype=np.int64), doc_lens)
    position_ids = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, doc_lens)
    return ids, labels, position_ids, segment_ids


def collate(samples: Sequence[Sample], *, pad_id: int = 0, flatten: bool = False,
            sources: Sequence[int] | None = None) -> dict:
    """Pad a micro-batch to its longest sample (or flatten it into one row) as torch tensors.
    With `sources` (the data source of each sample) the batch also carries `source_ids`: the
    source of every token (-1 on pads), for per-source losses."""
    rows = [sample_row(s) for s in samples]
    if sources is not None:  # a fifth column, carried through flattening and padding
        rows = [r + (np.full(len(r[0]), k, dtype=np.int64),) for r, k in zip(rows, sources)]
    if flatten:  # one row; segment ids offset so documents of different samples stay distinct
        offsets = np.cumsum([0] + [int(r[3].max(initial=-1)) + 1 for r in rows[:-1]])
        rows = [(r[0], r[1], r[2], r[3] + off, *r[4:]) for r, off in zip(rows, offsets)]
        rows = [tuple(np.concatenate(parts) for parts in zip(*rows))]
    length = max(len(r[0]) for r in rows)
    batch = len(rows)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((batch, length), dtype=np.int64)
    segment_ids = np.full((batch, length), -1, dtype=np.int64)
    source_ids = np.full((batch, length), -1, dtype=np.int64)
    for b, (ids, lab, pos, seg, *src) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n], labels[b, :n], segment_ids[b, :n] = ids, lab, seg
        position_ids[b, :n] = pos
        position_ids[b, n:] = np.arange(length - n)  # pads: their own short "document"
        if src:
            source_ids[b, :n] = src[0]
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "num_tokens": int(sum(len(r[0]) for r in rows)),
    }
    if sources is not None:
        out["source_ids"] = torch.from_numpy(source_ids)
        out["source_samples"] = list(sources)
    return out


def attention_mask_4d(segment_ids: torch.Tensor, attn_implementation: str,
                      dtype: torch.dtype) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, L, L): bool (True = attend) for sdpa, 0/min for eager."""
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None, :, :]
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def model_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype,
                 device: torch.device) -> dict:
    """Keyword arguments for the model's forward from a collated batch."""
    inputs = {"input_ids": batch["input_ids"].to(device),
              "position_ids": batch["position_ids"].to(device)}
    if attn_implementation == VARLEN_SDPA:  # boundaries stay on the CPU: read once per layer
        bounds = document_bounds(batch["segment_ids"])
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = bounds
    elif attn_implementation != "flash_attention_2":
        inputs["attention_mask"] = attention_mask_4d(batch["segment_ids"].to(device),
                                                     attn_implementation, dtype)
    return inputs


def count_loss_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


class RankSampler(Sampler[int]):
    """Endless stream of this rank's sample indices from the global stream, from `start` on."""

    def __init__(self, sampler: GlobalSampler | BlendedSampler, *, start: int, rank: int,
                 world_size: int):
        self.sampler, self.start, self.rank, self.world_size = sampler, start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return RankIterator(self.sampler, start=self.start, rank=self.rank,
                            world_size=self.world_size)


class TaggedSample(NamedTuple):
    sample: Sample
    source: int


class _SourceTagged:
    """`dataset[i]` -> (sample, its source), for datasets made of several sources end to end."""

    def __init__(self, dataset: TokenDataset, starts: Sequence[int]):
        self.dataset, self.starts = dataset, list(starts)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> TaggedSample:
        return TaggedSample(self.dataset[i], bisect.bisect_right(self.starts, int(i)) - 1)


class _Collator:
    """Picklable collate (DataLoader workers)."""

    def __init__(self, pad_id: int, flatten: bool):
        self.pad_id, self.flatten = pad_id, flatten

    def __call__(self, samples: Sequence[Sample] | Sequence[TaggedSample]) -> dict:
        if samples and isinstance(samples[0], TaggedSample):
            return collate([t.sample for t in samples], pad_id=self.pad_id, flatten=self.flatten,
                           sources=[t.source for t in samples])
        return collate(samples, pad_id=self.pad_id, flatten=self.flatten)


@dataclass
class DataSources:
    """A `--data_path`/`--eval_data_path` value opened: its sources, end to end in `dataset`."""
    dataset: TokenDataset           # every source, in order (indices: starts[k] + i)
    sources: list[TokenDataset]
    names: list[str]                # log names: the path's last component, numbered if repeated
    weights: list[float] | None     # normalised, or None for plain concatenation

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.sources]

    @property
    def starts(self) -> list[int]:
        return [0] + np.cumsum(self.sizes).tolist()


def open_sources(tokens: Sequence[str], *, flag: str) -> DataSources:
    """Open `--data_path` tokens (`A B` or `0.7 A 0.3 B`; see shardfmt.mixing) of any kind."""
    entries = parse_mix(tokens, flag=flag)
    sources = [open_source(e.path) for e in entries]
    for e, src in zip(entries, sources):
        if len(src) == 0:
            raise UsageError(f"{flag} {e.path}: the dataset has no samples; re-encode it or drop it")
    dataset = sources[0] if len(sources) == 1 else ConcatDataset(sources)
    weights = [e.weight for e in entries] if entries[0].weight is not None else None
    return DataSources(dataset, sources, source_names([e.path for e in entries]), weights)


def build_train_sampler(data: DataSources, *, global_batch: int, seed: int, shuffle: bool,
                        saved_state: dict[str, Any] | None = None):
    """GlobalSampler over the concatenation, or a BlendedSampler for weighted sources. A resumed
    mix keeps its checkpoint's block (its global batch), so the stream continues unchanged when
    the number of ranks changes."""
    if data.weights is None:
        return GlobalSampler(len(data.dataset), seed=seed, shuffle=shuffle)
    block = int((saved_state or {}).get("block", global_batch))
    return BlendedSampler(data.sizes, data.weights, block=block, seed=seed, shuffle=shuffle)


def train_loader(dataset, sampler: GlobalSampler | BlendedSampler, *, start: int, rank: int,
                 world_size: int, micro_batch_size: int, pad_id: int, flatten: bool,
                 num_workers: int, seed: int, source_starts: Sequence[int] | None = None
                 ) -> DataLoader:
    """Endless DataLoader of micro-batches; rank r reads global positions start+r, start+r+W, ...
    With `source_starts` (more than one source) each batch carries `source_ids`."""
    generator = torch.Generator().manual_seed(seed + rank)
    if source_starts is not None:
        dataset = _SourceTagged(dataset, source_starts)
    return DataLoader(dataset, batch_size=micro_batch_size,
                      sampler=RankSampler(sampler, start=start, rank=rank, world_size=world_size),
                      collate_fn=_Collator(pad_id, flatten), num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      generator=generator)


@dataclass
class EvalShard:
    """This rank's share of an eval set: equal batch counts on every rank (ZeRO-3 needs lockstep);
    positions past the end reuse sample 0 with weight 0."""
    indices: np.ndarray
    weights: np.ndarray


def eval_sample_count(num_samples: int, max_samples: int) -> int:
    """How many samples (from the start) of an eval set are evaluated: all when max_samples is 0
    (--eval_max_samples)."""
    return min(num_samples, max_samples) if max_samples else num_samples


def eval_shard(num_samples: int, rank: int, world_size: int, micro_batch_size: int) -> EvalShard:
    per_rank = -(-num_samples // world_size)
    per_rank = -(-per_rank // micro_batch_size) * micro_batch_size
    positions = GlobalSampler.rank_positions(0, rank, world_size, per_rank)
    valid = positions < num_samples
    return EvalShard(np.where(valid, positions, 0), valid.astype(np.float32))


def eval_batches(dataset, shard: EvalShard, *, micro_batch_size: int, pad_id: int,
                 flatten: bool) -> Iterator[dict]:
    for k in range(0, len(shard.indices), micro_batch_size):
        idx = shard.indices[k:k + micro_batch_size]
        batch = collate([dataset[int(i)] for i in idx], pad_id=pad_id, flatten=flatten)
        if shard.weights[k:k + micro_batch_size].min() == 0:
            # zero-weight padding samples: drop their loss tokens, keep the forward in lockstep
            keep = torch.from_numpy(shard.weights[k:k + micro_batch_size] > 0)
            if flatten:
                lens = [len(dataset[int(i)].input_ids) for i in idx]
                keep = torch.repeat_interleave(keep, torch.tensor(lens))[None, :]
                keep = torch.nn.functional.pad(keep, (0, batch["labels"].shape[1] - keep.shape[1]))
            else:
                keep = keep[:, None]
            batch["labels"] = torch.where(keep, batch["labels"], IGNORE_INDEX)
        yield batch
