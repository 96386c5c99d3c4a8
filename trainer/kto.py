"""`--objective kto`: Kahneman-Tversky Optimization on unpaired feedback (Ethayarajh et al. 2024),
as TRL 1.16's KTOTrainer (loss_type "kto"), on `--encode_type kto` datasets (shardfmt/preference.py:
one example per document segment, its boolean label in the segment's flags).

Per example i with s_i = log pi(completion | prompt) summed over the completion's tokens and r_i the
same under the reference model (`kto_losses` in trainer/preference.py, checked against TRL):
    desirable    loss_i = w_d (1 - sigmoid(beta (s_i - r_i - z0)))      reward_i = beta (s_i - r_i)
    undesirable  loss_i = w_u (1 - sigmoid(beta (z0 - s_i + r_i)))
z0, the KL reference point, = max(0, mean over mismatched sequences of (s'_j - r'_j)), detached,
where mismatched sequence j = prompt j + completion j-1 (cyclic), as TRL builds them.

Choices (trainer/README.md):
  - the mismatched pairs are built over ALL examples a rank sees in one optimizer step (every
    micro-batch of the accumulation, in order), and z0 is the mean over all of them of ALL ranks
    (all-reduced before the first backward; TRL gathers per micro-batch across processes). So
    accumulation 4 x 1 gives exactly the numbers of one micro-batch of 4, packing (several
    examples per sample) changes nothing, and with accumulation 1 on one rank the step is TRL's
    batch. Across ranks each rank pairs its own examples, so 2 ranks differ from 1 process in which
    completions are mismatched (z0 still averages over both ranks, as TRL's gather does).
  - the step loss is the sum of the per-example losses over the global batch divided by the global
    number of examples (SFT's and DPO's global normalisation; TRL: the batch mean).
  - the mismatched sequences are cut to the dataset's --max_length (the encoder's; TRL truncates
    them at max_length too). Costs: two extra no-grad forwards per micro-batch (policy and
    reference on the mismatched sequences), as TRL.
  - z0 depends only on the step's data and weights, so resume is exact with no extra state.
Precomputed reference log-probs are refused (trainer/args.py): the mismatched pairs depend on
each step's batch, so their reference log-probs cannot be computed once per dataset.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

from shardfmt import Sample
from shardfmt.preference import segment_desirable
from trainer.data import IGNORE_INDEX, collate, eval_sample_count, eval_shard, model_inputs
from trainer.errors import UsageError
from trainer.preference import PreferenceRun, kto_losses, logps_from_logits

KTO_METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "kl")
# sums kept per step / logging window: the means divide by the desirable / undesirable counts
_SUM_KEYS = ("loss", "examples", "chosen", "rejected", "rewards/chosen", "rewards/rejected",
             "logps/chosen", "logps/rejected")


class UnpairedSource(torch.utils.data.Dataset):
    """Samples of a kto dataset, each with the labels of its examples (True = desirable)."""

    def __init__(self, dataset, source_starts: Sequence[int] | None = None):
        self.dataset = dataset
        self.source_starts = list(source_starts) if source_starts is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample, labels = self.dataset[int(i)], segment_desirable(self.dataset, int(i))
        if self.source_starts is None:
            return sample, labels
        return sample, labels, bisect.bisect_right(self.source_starts, int(i)) - 1


def collate_unpaired(items: Sequence[tuple], *, pad_id: int, flatten: bool) -> dict:
    """`trainer.data.collate` (each example is one document) plus `label_seq` (per position, the
    example number within the micro-batch whose next token it predicts, -1 where no label),
    `num_seqs`, `desirable` (per example), `examples` (per example: prompt ids, completion ids,
    completion mask; the completion starts at the first trained token), `seqs_per_sample`, and
    with sources `example_sources`. Items: (sample, labels or None[, source number])."""
    samples = [item[0] for item in items]
    batch = collate(samples, pad_id=pad_id, flatten=flatten)
    seg = batch["segment_ids"].numpy()
    per_sample = [len(s.doc_lens) for s in samples]
    if not flatten:  # per row, segments restart at 0: offset them by the earlier rows' segments
        offsets = np.cumsum([0] + per_sample[:-1])[:, None]
        seg = np.where(seg >= 0, seg + offsets, -1)
    next_seg = np.pad(seg, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
    labels_next = np.pad(batch["labels"].numpy(), ((0, 0), (0, 1)),
                         constant_values=IGNORE_INDEX)[:, 1:]
    batch["label_seq"] = torch.from_numpy(np.where(labels_next != IGNORE_INDEX, next_seg, -1))
    batch["num_seqs"] = sum(per_sample)
    batch["seqs_per_sample"] = per_sample
    examples = []
    for s in samples:
        ends = np.cumsum(s.doc_lens).tolist()
        for a, b in zip([0] + ends[:-1], ends):
            ids, mask = np.asarray(s.input_ids[a:b]), np.asarray(s.loss_mask[a:b], bool)
            p = int(np.argmax(mask)) if mask.any() else len(mask)
            examples.append((ids[:p], ids[p:], mask[p:]))
    batch["examples"] = examples
    if all(item[1] is not None for item in items):
        batch["desirable"] = torch.from_numpy(np.concatenate([np.asarray(item[1], bool)
                                                              for item in items]))
    if items and len(items[0]) > 2:
        batch["example_sources"] = np.repeat([item[2] for item in items], per_sample)
    return batch


class UnpairedCollator:
    def __init__(self, pad_id: int, flatten: bool):
        self.pad_id, self.flatten = pad_id, flatten

    def __call__(self, items):
        return collate_unpaired(items, pad_id=self.pad_id, flatten=self.flatten)


def mismatched_batches(batches: Sequence[dict], *, pad_id: int, flatten: bool,
                       max_length: int | None) -> list[dict]:
    """The KL batches of a group of micro-batches: sequence j (over all their examples, in order)
    = prompt j + completion j-1 (cyclic; TRL's rotation by one), its loss mask the completion's,
    cut to `max_length`. Grouped like the micro-batches (same examples per sample), so each KL
    forward has the shape of its micro-batch. Raises UsageError if there are fewer than 2."""
    examples = [e for b in batches for e in b["examples"]]
    n = len(examples)
    if n < 2:
        raise UsageError(f"--objective kto: {n} example in this rank's step; the KL reference "
                         f"point needs mismatched pairs of at least 2: raise --micro_batch_size "
                         f"or --gradient_accumulation_steps")
    out, j = [], 0
    for b in batches:
        samples = []
        for k in b["seqs_per_sample"]:
            ids, masks, lens = [], [], []
            for _ in range(k):
                prompt, (_, completion, cmask) = examples[j][0], examples[(j - 1) % n]
                seq = np.concatenate([prompt, completion])[:max_length]
                mask = np.concatenate([np.zeros(len(prompt), bool), cmask])[:max_length]
                ids.append(seq)
                masks.append(mask)
                lens.append(len(seq))
                j += 1
            samples.append(Sample(np.concatenate(ids), np.concatenate(masks),
                                  np.array(lens, np.int32)))
        out.append(collate_unpaired([(s, None) for s in samples], pad_id=pad_id, flatten=flatten))
    return out


class KtoRun(PreferenceRun):
    """What `trainer/train.py` delegates to for --objective kto (the reference model set-up is
    PreferenceRun's: --ref_model_path, the starting model, or the adapter-disabled policy)."""

    def __init__(self, settings, *, train_ds, eval_ds, args, info, dtype, attn: str,
                 flatten: bool, pad_id: int, train_sources=None):
        self.s = settings
        self.args, self.info, self.dtype, self.attn = args, info, dtype, attn
        self.flatten, self.pad_id = flatten, pad_id
        self.ref_model = None
        self.use_adapter_off = False
        self.ref_model_path = args.ref_model_path or args.model_path
        several = train_sources is not None and len(train_sources.sources) > 1
        self.source_names = list(train_sources.names) if several else []
        self.train_source = UnpairedSource(train_ds, train_sources.starts if several else None)
        self.source_window = np.zeros((2, len(self.source_names)))  # loss sums, examples
        self.eval_source = UnpairedSource(eval_ds) if eval_ds is not None else None
        self.collator = UnpairedCollator(pad_id, flatten)
        self.kl_max_length = _sequence_max_length([train_ds] + ([eval_ds] if eval_ds else []))
        self.window = dict.fromkeys(_SUM_KEYS + ("kl", "steps"), 0.0)
        self.last: dict[str, float] = {}

    # log-probs ------------------------------------------------------------------------------
    def _logps(self, engine, batch: dict, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) summed completion log-probs per example of `batch`."""
        inputs = model_inputs(batch, self.attn, self.dtype, self.info.device)
        with torch.set_grad_enabled(grad):
            logits = engine(**inputs).logits
            sums, _ = logps_from_logits(logits, batch)
        vocab = logits.shape[-1]
        del logits
        return sums, self._reference_logps(engine, inputs, batch, vocab).to(sums.dtype)

    def _kl_sum(self, engine, batches: Sequence[dict], weights: Sequence[np.ndarray] | None = None
                ) -> tuple[float, float]:
        """(sum of policy - reference log-probs over the mismatched sequences, their count)."""
        total, count = 0.0, 0.0
        for k, kl_batch in enumerate(mismatched_batches(batches, pad_id=self.pad_id,
                                                        flatten=self.flatten,
                                                        max_length=self.kl_max_length)):
            pol, ref = self._logps(engine, kl_batch, grad=False)
            w = np.ones(len(pol)) if weights is None else weights[k]
            total += float(((pol.double() - ref.double()).cpu().numpy() * w).sum())
            count += float(w.sum())
        return total, count

    def _losses(self, engine, batch: dict, z0_raw: float, *, grad: bool) -> dict:
        pol, ref = self._logps(engine, batch, grad=grad)
        one = torch.tensor([z0_raw], dtype=pol.dtype, device=pol.device)
        out = kto_losses(logps=pol, ref_logps=ref, desirable=batch["desirable"].to(pol.device),
                         kl_logps=one, ref_kl_logps=torch.zeros_like(one), beta=self.s.beta,
                         desirable_weight=self.s.desirable_weight,
                         undesirable_weight=self.s.undesirable_weight)
        out["logps"] = pol.detach()
        return out

    # one optimizer step ---------------------------------------------------------------------
    def train_step(self, engine, micro_batches: list[dict]) -> tuple[float, int]:
        """One optimizer step; returns (global mean per-example loss, global example count)."""
        from trainer.dist import all_reduce_sum
        kl_sum, kl_count = self._kl_sum(engine, micro_batches)
        local = sum(b["num_seqs"] for b in micro_batches)
        global_n, kl_sum, kl_count = all_reduce_sum([local, kl_sum, kl_count], self.info.device)
        z0_raw = kl_sum / max(kl_count, 1.0)
        scale = self.info.world_size / max(global_n, 1.0)  # DeepSpeed averages over ranks
        sums = dict.fromkeys(_SUM_KEYS, 0.0)
        per_source = np.zeros_like(self.source_window)
        for batch in micro_batches:
            out = self._losses(engine, batch, z0_raw, grad=True)
            engine.backward(out["loss"].sum() * scale, scale_wrt_gas=False)
            engine.step()
            _add_sums(sums, out, batch["desirable"])
            if self.source_names:
                src, k = batch["example_sources"], len(self.source_names)
                per_source[0] += np.bincount(src, weights=out["loss"].detach().double().cpu()
                                             .numpy(), minlength=k)
                per_source[1] += np.bincount(src, minlength=k)
        reduced = all_reduce_sum([sums[k] for k in _SUM_KEYS] + per_source.ravel().tolist(),
                                 self.info.device)
        totals = dict(zip(_SUM_KEYS, reduced[:len(_SUM_KEYS)]))
        self.source_window += np.asarray(reduced[len(_SUM_KEYS):]).reshape(per_source.shape)
        z0 = max(z0_raw, 0.0)
        self.last = _means(totals, kl=z0)
        for k in _SUM_KEYS:
            self.window[k] += totals[k]
        self.window["kl"] += z0
        self.window["steps"] += 1
        return totals["loss"] / max(global_n, 1.0), int(global_n)

    def window_metrics(self) -> dict[str, float]:
        """Means since the last logging step (rewards/logps over the desirable, resp. undesirable
        examples, kl over the steps), then reset."""
        w = self.window
        out = _means(w, kl=w["kl"] / max(w["steps"], 1.0))
        out["examples_per_step"] = w["examples"]
        out["desirable_fraction"] = w["chosen"] / max(w["examples"], 1.0)
        self.window = dict.fromkeys(self.window, 0.0)
        for name, loss_sum, n in zip(self.source_names, *self.source_window):
            out[f"loss/{name}"] = loss_sum / n if n else None
            out[f"examples/{name}"] = int(n)
        self.source_window[:] = 0
        return out

    def evaluate(self, engine, step: int) -> dict:
        """Over the whole eval set: z0 from mismatched pairs over each rank's eval examples (one
        group, all-reduced), then the mean per-example loss and TRL's metrics."""
        from trainer.dist import all_reduce_sum
        src, mbs = self.eval_source, self.args.micro_batch_size
        shard = eval_shard(eval_sample_count(len(src), self.args.eval_max_samples),
                           self.info.rank, self.info.world_size, mbs)
        groups = [shard.indices[k:k + mbs] for k in range(0, len(shard.indices), mbs)]
        weights = [np.repeat(shard.weights[k:k + mbs], [len(src.dataset[int(i)].doc_lens)
                                                        for i in shard.indices[k:k + mbs]])
                   for k in range(0, len(shard.indices), mbs)]

        def batches():  # collated again on the second pass: an eval set is not held in memory
            return [self.collator([src[int(i)] for i in idx]) for idx in groups]

        engine.eval()
        sums = dict.fromkeys(_SUM_KEYS, 0.0)
        with torch.no_grad():
            kl_sum, kl_count = self._kl_sum(engine, batches(), weights)
            kl_sum, kl_count = all_reduce_sum([kl_sum, kl_count], self.info.device)
            z0_raw = kl_sum / max(kl_count, 1.0)
            for batch, w in zip(batches(), weights):
                out = self._losses(engine, batch, z0_raw, grad=False)
                keep = torch.from_numpy(w > 0).to(out["loss"].device)
                _add_sums(sums, {k: v[keep] for k, v in out.items() if v.dim()},
                          batch["desirable"][keep.cpu()])
        engine.train()
        totals = dict(zip(_SUM_KEYS, all_reduce_sum([sums[k] for k in _SUM_KEYS],
                                                    self.info.device)))
        means = _means(totals, kl=max(z0_raw, 0.0))
        result = {"step": step, "eval_loss": totals["loss"] / max(totals["examples"], 1.0),
                  "eval_examples": int(totals["examples"])}
        result.update({f"eval_{k}": v for k, v in means.items()})
        return result


def _add_sums(sums: dict, out: dict, desirable: torch.Tensor) -> None:
    d = desirable.to(out["loss"].device)
    sums["loss"] += float(out["loss"].detach().sum())
    sums["examples"] += len(d)
    sums["chosen"] += float(d.sum())
    sums["rejected"] += float((~d).sum())
    for side, m in (("chosen", d), ("rejected", ~d)):
        sums[f"rewards/{side}"] += float(out["rewards"][m].sum())
        sums[f"logps/{side}"] += float(out["logps"][m].sum())


def _means(totals: dict, *, kl: float) -> dict[str, float | None]:
    """TRL's KTO metrics: rewards/logps means over the desirable (chosen) and the undesirable
    (rejected) examples; None where a side had no example."""
    out: dict[str, float | None] = {}
    for side in ("chosen", "rejected"):
        n = totals[side]
        out[f"rewards/{side}"] = totals[f"rewards/{side}"] / n if n else None
        out[f"logps/{side}"] = totals[f"logps/{side}"] / n if n else None
    c, r = out["rewards/chosen"], out["rewards/rejected"]
    out["rewards/margins"] = c - r if c is not None and r is not None else None
    out["kl"] = kl
    return out


def _sequence_max_length(datasets) -> int | None:
    """The longest sequence the encoder allowed (its --max_length, the manifests' "kto" record):
    the mismatched sequences are cut there. None if not recorded."""
    lengths = [m.get("kto", {}).get("sequence_max_length") for ds in datasets
               for m in ds.manifests]
    return max(lengths) if lengths and all(lengths) else None
