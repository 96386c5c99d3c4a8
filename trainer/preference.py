"""Preference objectives (`--objective dpo|ipo|orpo|simpo`) on pair datasets (shardfmt/preference.py).

Per pair p, with s = log pi(response | prompt) summed over the response tokens, n = their count,
and r = the same under the reference model (the formulas and defaults of TRL 1.16; tests compare
losses and rewards with TRL's own code):

  dpo    z = (s_c - r_c) - (s_r - r_r)
         loss = -(1-eps) logsigmoid(beta z) - eps logsigmoid(-beta z)   (eps = --label_smoothing:
         conservative DPO; eps = 0 is TRL's "sigmoid")                   reward = beta (s - r)
  ipo    loss = ((s_c - r_c)/n_c - (s_r - r_r)/n_r - 1/(2 beta))^2      reward = beta (s - r)
  simpo  a = s/n;  z = a_c - a_r - gamma/beta
         loss = -(1-eps) logsigmoid(beta z) - eps logsigmoid(-beta z)    reward = beta a
  orpo   a = s/n;  log_odds = (a_c - a_r) - (log(1-e^a_c) - log(1-e^a_r))
         loss = NLL_c * P/T - alpha logsigmoid(log_odds)                 reward = alpha a
         NLL_c: minus the log-prob of EVERY token of the chosen sequence but its first (prompt and
         response, as TRL's ORPOTrainer: "computed over the full prompt and response"); T: the
         number of those tokens over all chosen sequences of the global batch; P: its pairs. So
         the mean over the pairs is TRL's loss on the global batch taken as one batch:
         sum(NLL_c)/T (token mean, nn.CrossEntropyLoss) - alpha * mean(logsigmoid(log_odds)).
  + sft_weight * (-a_c)   (--sft_weight: NLL of the chosen response, per token, for any objective)

Global normalisation, as for SFT: the loss of an optimizer step is the sum of the per-pair losses
of the whole global batch (all micro-steps and ranks) divided by the global number of pairs, which
is all-reduced before the first backward (with, for orpo, the global count T of chosen tokens). So accumulation, data parallelism and packing (several
pairs per sample: each sequence is its own document, attention never crosses them) give the same
gradients as one big batch.

Reference log-probs (dpo, ipo) come from, in this order: a precomputed file beside each dataset
(`--precomputed_ref_logps`, written by `python -m trainer.reference_logps`; refused unless its
dataset and model hashes match); `--ref_model_path` (default: the starting model, loaded a second
time, frozen; under ZeRO-3 partitioned like the policy); or, under LoRA without --ref_model_path,
the policy with its adapters disabled (no second copy in memory).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from shardfmt.preference import is_kto, is_preference, pair_counts, split_pairs
from shardfmt.writer import open_atomic
from trainer.data import IGNORE_INDEX, RankSampler, collate
from trainer.dtypes import precision_name
from trainer.errors import UsageError

log = logging.getLogger("trainer")

REFERENCE_OBJECTIVES = ("dpo", "ipo")        # the ones that need reference log-probs (of OBJECTIVES
                                             # in trainer/args.py)
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
REF_LOGPS_FILE = "reference_logps.npz"


@dataclass(frozen=True)
class ObjectiveSettings:
    objective: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_alpha: float = 0.1
    sft_weight: float = 0.0
    desirable_weight: float = 1.0      # kto (trainer/kto.py): TRL's desirable_weight
    undesirable_weight: float = 1.0    # kto: TRL's undesirable_weight

    @property
    def needs_reference(self) -> bool:
        return self.objective in REFERENCE_OBJECTIVES or self.objective == "kto"


# -- the losses (pure functions of per-pair log-probs; fp32 or fp64) ------------------------------
def pair_losses(s: ObjectiveSettings, *, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                chosen_lens: torch.Tensor, rejected_lens: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None,
                ref_rejected_logps: torch.Tensor | None = None,
                chosen_nll: torch.Tensor | None = None,
                nll_scale: float | None = None) -> dict[str, torch.Tensor]:
    """Per-pair `loss`, `chosen_rewards`, `rejected_rewards` and the `chosen_logps` /
    `rejected_logps` the objective uses (sums for dpo/ipo, per-token averages for simpo/orpo).
    orpo also needs `chosen_nll` (per pair: minus the summed log-probs of all chosen tokens but the
    first) and `nll_scale` = pairs / those tokens, over the global batch; it returns the parts
    `nll` (= chosen_nll) and `odds_ratio_loss` (-alpha logsigmoid(log_odds)) too."""
    eps = s.label_smoothing
    n_c, n_r = chosen_lens.clamp(min=1).to(chosen_logps.dtype), \
        rejected_lens.clamp(min=1).to(chosen_logps.dtype)
    avg_c, avg_r = chosen_logps / n_c, rejected_logps / n_r
    if s.objective in REFERENCE_OBJECTIVES:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"--objective {s.objective} needs reference log-probs")
        ratio_c, ratio_r = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        if s.objective == "dpo":
            z = ratio_c - ratio_r
            loss = -(1 - eps) * F.logsigmoid(s.beta * z) - eps * F.logsigmoid(-s.beta * z)
        else:
            loss = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * s.beta)) ** 2
        reward_c, reward_r = s.beta * ratio_c, s.beta * ratio_r
        used_c, used_r = chosen_logps, rejected_logps
    elif s.objective == "simpo":
        z = avg_c - avg_r - s.simpo_gamma / s.beta
        loss = -(1 - eps) * F.logsigmoid(s.beta * z) - eps * F.logsigmoid(-s.beta * z)
        reward_c, reward_r = s.beta * avg_c, s.beta * avg_r
        used_c, used_r = avg_c, avg_r
    elif s.objective == "orpo":
        if chosen_nll is None or nll_scale is None:
            raise ValueError("--objective orpo needs the chosen sequences' NLL and its scale")
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        odds_ratio_loss = -s.orpo_alpha * F.logsigmoid(log_odds)
        loss = chosen_nll * nll_scale + odds_ratio_loss
        reward_c, reward_r = s.orpo_alpha * avg_c, s.orpo_alpha * avg_r
        used_c, used_r = avg_c, avg_r
        parts = {"nll": chosen_nll.detach(), "odds_ratio_loss": odds_ratio_loss.detach()}
    else:
        raise ValueError(f"--objective {s.objective}: not a preference objective")
    if s.objective != "orpo":
        parts = {}
    if s.sft_weight:
        loss = loss + s.sft_weight * (-avg_c)
    return {"loss": loss, "chosen_rewards": reward_c.detach(), "rejected_rewards": reward_r.detach(),
            "chosen_logps": used_c.detach(), "rejected_logps": used_r.detach(), **parts}


def kto_losses(*, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
               kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, beta: float = 0.1,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) as TRL 1.16's KTOTrainer (loss_type "kto"), for unpaired
    samples: `logps`/`ref_logps` the summed completion log-probs of each sample under the policy
    and the reference, `desirable` its boolean label, `kl_logps`/`ref_kl_logps` those of the
    mismatched sequences (`kto_mismatched`: prompt i with completion i-1) that estimate the KL
    reference point z0 = max(0, mean(kl_logps - ref_kl_logps)), detached. Per sample:
        desirable    w_d (1 - sigmoid(beta (r - z0)))        r = logps - ref_logps
        undesirable  w_u (1 - sigmoid(beta (z0 - r)))        reward = beta r
    TRL's loss is the mean over the batch's samples; z0 is estimated over the same batch."""
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    ratio = logps - ref_logps
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return {"loss": loss, "rewards": (beta * ratio).detach(), "kl": kl}


def kto_mismatched(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray]
                   ) -> list[np.ndarray]:
    """The KL sequences of a batch, as TRL builds them: prompt i + completion i-1 (cyclic)."""
    n = len(prompts)
    return [np.concatenate([prompts[i], completions[(i - 1) % n]]) for i in range(n)]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012), as in TRL's ORPO."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def metric_sums(out: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sums over the pairs of a micro-batch (divided by the global pair count later)."""
    c, r = out["chosen_rewards"], out["rejected_rewards"]
    return {"loss": float(out["loss"].detach().sum()), "rewards/chosen": float(c.sum()),
            "rewards/rejected": float(r.sum()), "rewards/accuracies": float((c > r).float().sum()),
            "rewards/margins": float((c - r).sum()), "logps/chosen": float(out["chosen_logps"].sum()),
            "logps/rejected": float(out["rejected_logps"].sum())}


# -- batches of pairs ----------------------------------------------------------------------------
class PairSource(torch.utils.data.Dataset):
    """Samples of a preference dataset, each with the precomputed reference log-probs of its pairs
    (shape (pairs, 2): chosen, rejected) or None."""

    def __init__(self, dataset, ref_logps: np.ndarray | None = None,
                 source_starts: Sequence[int] | None = None):
        self.dataset = dataset
        self.source_starts = list(source_starts) if source_starts is not None else None
        counts = pair_counts(dataset)
        self.pair_start = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.num_pairs = int(self.pair_start[-1])
        if ref_logps is not None and len(ref_logps) != self.num_pairs:
            raise UsageError(f"reference log-probs for {len(ref_logps)} pairs, the dataset has "
                             f"{self.num_pairs}")
        self.ref_logps = ref_logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[int(i)]
        ref = None
        if self.ref_logps is not None:
            ref = self.ref_logps[self.pair_start[i]:self.pair_start[i + 1]]
        if self.source_starts is None:
            return sample, ref
        return sample, ref, bisect.bisect_right(self.source_starts, int(i)) - 1


def collate_pairs(items: Sequence[tuple], *, pad_id: int, flatten: bool) -> dict:
    """`trainer.data.collate` (each sequence is one document) plus, per token position, the global
    sequence number within the micro-batch whose next token it predicts (`label_seq`, -1 where no
    label): sequence 2k is pair k's chosen, 2k+1 its rejected. Items are (sample, reference
    log-probs or None[, source number]); with sources, `pair_sources` holds each pair's."""
    samples = [item[0] for item in items]
    for k, s in enumerate(samples):
        if len(s.doc_lens) % 2:
            split_pairs(s, where=f"micro-batch sample {k}")  # raises, naming the problem
    batch = collate(samples, pad_id=pad_id, flatten=flatten)
    seg = batch["segment_ids"].numpy()
    if not flatten:  # per row, segments restart at 0: offset them by the earlier rows' segments
        per_row = [len(s.doc_lens) for s in samples]
        offsets = np.cumsum([0] + per_row[:-1])[:, None]
        seg = np.where(seg >= 0, seg + offsets, -1)
    next_seg = np.pad(seg, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
    labels_next = np.pad(batch["labels"].numpy(), ((0, 0), (0, 1)),
                         constant_values=IGNORE_INDEX)[:, 1:]
    label_seq = np.where(labels_next != IGNORE_INDEX, next_seg, -1)
    batch["label_seq"] = torch.from_numpy(label_seq)
    # the same for EVERY next token inside the sequence (prompt too): ORPO's NLL term
    token_seq = np.where((seg >= 0) & (next_seg == seg), seg, -1)
    batch["token_seq"] = torch.from_numpy(token_seq)
    batch["chosen_tokens"] = int(((token_seq >= 0) & (token_seq % 2 == 0)).sum())
    num_seqs = sum(len(s.doc_lens) for s in samples)
    batch["num_pairs"] = num_seqs // 2
    if all(item[1] is not None for item in items):
        batch["ref_logps"] = torch.from_numpy(
            np.concatenate([item[1] for item in items]).astype(np.float64))
    if items and len(items[0]) > 2:
        batch["pair_sources"] = np.repeat([item[2] for item in items],
                                          [len(s.doc_lens) // 2 for s in samples])
    return batch


class _PairCollator:
    def __init__(self, pad_id: int, flatten: bool):
        self.pad_id, self.flatten = pad_id, flatten

    def __call__(self, items):
        return collate_pairs(items, pad_id=self.pad_id, flatten=self.flatten)


def pair_loader(source: PairSource, sampler, *, start: int, rank: int, world_size: int,
                micro_batch_size: int, pad_id: int, flatten: bool, num_workers: int,
                seed: int, collator=None) -> DataLoader:
    """Endless DataLoader of pair micro-batches (same global order as `trainer.data.train_loader`);
    `collator`: another collate callable (kto's unpaired examples)."""
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(source, batch_size=micro_batch_size,
                      sampler=RankSampler(sampler, start=start, rank=rank, world_size=world_size),
                      collate_fn=collator or _PairCollator(pad_id, flatten),
                      num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      generator=generator)


# -- log-probs -----------------------------------------------------------------------------------
def sequence_logps(model, inputs: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token) over each sequence's labelled tokens, their count), in fp32, for the
    2 * num_pairs sequences of the batch, from full logits (one B x L x V tensor)."""
    return logps_from_logits(model(**inputs).logits, batch)


def logps_from_logits(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"].to(logits.device)
    next_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    n = batch["num_seqs"] if "num_seqs" in batch else 2 * batch["num_pairs"]  # kto: one per example
    return _per_sequence(logits, next_labels, batch["label_seq"].to(logits.device), n)


def chosen_nll_from_logits(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(minus the summed log-probs of every token of each chosen sequence but its first, their
    count) per pair: ORPO's NLL term, as TRL's (prompt tokens included)."""
    ids = batch["input_ids"].to(logits.device)
    next_ids = F.pad(ids, (0, 1), value=0)[:, 1:]
    seq = batch["token_seq"].to(logits.device)
    seq = torch.where(seq % 2 == 0, seq, -1)  # chosen sequences only: skip the rejected' logits
    sums, counts = _per_sequence(logits, next_ids, seq, 2 * batch["num_pairs"])
    return -sums[0::2], counts[0::2]


def _per_sequence(logits: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = seq >= 0
    token_logps = -F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    sums = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(0, seq[keep],
                                                                               token_logps)
    counts = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(
        0, seq[keep], torch.ones_like(token_logps))
    return sums, counts


# -- precomputed reference file ------------------------------------------------------------------
def dataset_fingerprint(manifest: dict) -> str:
    """xxh3-64 over the manifest's shard checksums: changes with any token of the dataset."""
    import xxhash
    h = xxhash.xxh3_64()
    for shard in manifest["shards"]:
        for kind in ("bin", "idx"):
            h.update(f"{shard['name']}:{kind}:{shard['files'][kind]['xxh3_64']};".encode())
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json")


def model_fingerprint(model_path: str | Path) -> str:
    """xxh3-64 over the model directory's weight and config files (names, sizes and bytes);
    ~0.1 s per GB."""
    import xxhash
    h = xxhash.xxh3_64()
    root = Path(model_path)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not p.name.startswith(("tokenizer", "special_tokens", "trainer_state",
                                              "resolved_config", "generation_config")))
    for p in files:
        h.update(f"{p.name}:{p.stat().st_size};".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def save_reference_file(path: Path, logps: np.ndarray, meta: dict) -> None:
    """npz with `logps` (pairs x 2, float64) and `meta` (JSON text): loads without pickle. Written
    durably (shardfmt's open_atomic: unique temp + fsync + rename + directory fsync; the temp is
    removed on failure), so an interrupted run leaves no file that looks complete."""
    import json
    with open_atomic(path, "wb") as f:
        np.savez(f, logps=logps.astype(np.float64), meta=np.array(json.dumps(meta)))


def load_reference_file(path: Path, *, dataset_hash: str, model_hash: str, num_pairs: int,
                        ref_model_path: str, dtype: torch.dtype, attn: str) -> np.ndarray:
    """The precomputed log-probs, refused (UsageError naming the file and the fix) if they were
    computed for another dataset, another reference model or another pair count, or in another
    precision or attention implementation than this run's (`dtype`, `attn`): step 1 then would
    not start with policy == reference."""
    import json
    if not path.is_file():
        raise UsageError(f"--precomputed_ref_logps: {path} not found; compute it with "
                         f"`python -m trainer.reference_logps --model_path {ref_model_path} "
                         f"--data_path {path.parent}`")
    with np.load(path, allow_pickle=False) as z:
        logps, meta = z["logps"], json.loads(str(z["meta"]))
    fix = (f"recompute it: python -m trainer.reference_logps --model_path {ref_model_path} "
           f"--data_path {path.parent} --overwrite")
    if meta.get("dataset_hash") != dataset_hash:
        raise UsageError(f"{path}: computed for another dataset (hash {meta.get('dataset_hash')}, "
                         f"this one is {dataset_hash}); {fix}")
    if meta.get("model_hash") != model_hash:
        raise UsageError(f"{path}: computed with another reference model ({meta.get('model_path')}, "
                         f"hash {meta.get('model_hash')}; {ref_model_path} is {model_hash}); {fix}")
    if logps.shape != (num_pairs, 2):
        raise UsageError(f"{path}: holds {logps.shape} values for {num_pairs} pairs; {fix}")
    if meta.get("precision") != reference_precision(dtype):
        raise UsageError(f"{path}: computed in {meta.get('precision')}, this run trains in "
                         f"{reference_precision(dtype)}; {fix} --precision {precision_name(dtype)}")
    if meta.get("attn_implementation") != attn:
        raise UsageError(f"{path}: computed with attention {meta.get('attn_implementation')}, "
                         f"this run uses {attn}; {fix} --attn_implementation {attn}")
    return logps


def reference_precision(dtype: torch.dtype) -> str:
    """How a reference file records its precision: 'float32', 'bfloat16', 'float16'."""
    return str(dtype).replace("torch.", "")


# -- the run-time part ---------------------------------------------------------------------------
def check_datasets(objective: str, sources: dict[str, list]) -> None:
    """Pair objectives need every source to be a pair dataset, kto every source an unpaired
    (encode_type kto) dataset, and SFT neither (mixes of kinds are refused); names the flag and
    the source."""
    want = {"sft": "plain", "kto": "kto"}.get(objective, "pairs")
    encode = {"pairs": "--encode_type preference", "kto": "--encode_type kto",
              "plain": "--encode_type qa|chat|pretrain"}[want]
    for flag, datasets in sources.items():
        for ds in datasets:
            manifests = ds.manifests
            if not manifests:   # Megatron data: plain sequences, no manifest, no pairs
                if want != "plain":
                    raise UsageError(f"{flag} {' '.join(ds.paths)}: a {ds.kind} dataset of plain "
                                     f"sequences, but --objective {objective} needs "
                                     f"{_NEED_TEXT[want]} in every source (encode with {encode}); "
                                     f"mixing kinds is not supported: train SFT data in its own "
                                     f"run, or add --sft_weight for an NLL term on the chosen "
                                     f"responses")
                continue
            for path, m in zip(ds.paths, manifests):
                have = "pairs" if is_preference(m) else "kto" if is_kto(m) else "plain"
                if have == want:
                    continue
                if objective == "sft":
                    raise UsageError(f"{flag} {path}: a {_KIND_TEXT[have]} dataset; train it with "
                                     f"--objective {'kto' if have == 'kto' else 'dpo|ipo|orpo|simpo'}"
                                     f", or encode the data as qa/chat for SFT; kinds of data "
                                     f"cannot be mixed in one run")
                raise UsageError(f"{flag} {path}: encode_type {m.get('encode_type')!r} "
                                 f"({_KIND_TEXT[have]}), but --objective {objective} needs "
                                 f"{_NEED_TEXT[want]} in every source (encode with {encode}"
                                 + (f", or use --objective {'kto' if have == 'kto' else 'dpo'}"
                                    if have != "plain" else "") +
                                 "); mixing kinds is not supported: train SFT data in its own "
                                 "run, or add --sft_weight for an NLL term on chosen")


_KIND_TEXT = {"pairs": "preference (pair)", "kto": "unpaired feedback (kto)",
              "plain": "plain (sft)"}
_NEED_TEXT = {"pairs": "preference pairs", "kto": "unpaired feedback examples (kto)",
              "plain": "plain sequences"}


class PreferenceRun:
    """What `trainer/train.py` delegates to when --objective is not sft."""

    def __init__(self, settings: ObjectiveSettings, *, train_ds, eval_ds, args, info, dtype,
                 attn: str, flatten: bool, pad_id: int, train_sources=None):
        self.s = settings
        self.args, self.info, self.dtype, self.attn = args, info, dtype, attn
        self.flatten, self.pad_id = flatten, pad_id
        self.ref_model = None
        self.use_adapter_off = False
        ref_train = ref_eval = None
        self.ref_model_path = args.ref_model_path or args.model_path
        if settings.needs_reference and args.precomputed_ref_logps:
            ref_train = self._load_precomputed(train_ds)
            if eval_ds is not None:
                ref_eval = self._load_precomputed(eval_ds)
        # several --data_path sources (a weighted mix too): per-source loss and pairs in the log
        several = train_sources is not None and len(train_sources.sources) > 1
        self.source_names = list(train_sources.names) if several else []
        self.train_source = PairSource(train_ds, ref_train,
                                       train_sources.starts if several else None)
        self.source_window = np.zeros((2, len(self.source_names)))  # loss sums, pairs
        self.eval_source = PairSource(eval_ds, ref_eval) if eval_ds is not None else None
        self.window = dict.fromkeys(("pairs",) + METRIC_NAMES, 0.0)
        self.last: dict[str, float] = {}

    def _load_precomputed(self, ds) -> np.ndarray:
        model_hash = model_fingerprint(self.ref_model_path)
        parts = []
        for path, manifest in zip(ds.paths, ds.manifests):
            n = int(manifest["totals"]["docs"]) // 2
            parts.append(load_reference_file(Path(path) / REF_LOGPS_FILE,
                                             dataset_hash=dataset_fingerprint(manifest),
                                             model_hash=model_hash, num_pairs=n,
                                             ref_model_path=self.ref_model_path,
                                             dtype=self.dtype, attn=self.attn))
        return np.concatenate(parts)

    def reference_source(self) -> str:
        if not self.s.needs_reference:
            return "none"
        if self.args.precomputed_ref_logps:
            return f"precomputed ({REF_LOGPS_FILE} beside each dataset)"
        if self.use_adapter_off:
            return "policy with LoRA adapters disabled"
        return f"model {self.ref_model_path}"

    # set-up after the policy exists
    def setup_reference(self, *, use_lora: bool, ds_config: dict, zero3: bool, tokenizer=None,
                        vocab_plan=None) -> None:
        """The reference model. When the policy's vocabulary grew to len(tokenizer) (--add_tokens,
        the data's added tokens; also on a resume, where the checkpoint already holds the rows),
        the reference gets the same rows, initialised as the policy's were (`vocab_plan`), or the
        run is refused."""
        if not self.s.needs_reference:
            return
        rows_needed = len(tokenizer) if tokenizer is not None else 0
        if self.args.precomputed_ref_logps:
            from transformers import AutoConfig
            ref_rows = getattr(AutoConfig.from_pretrained(self.ref_model_path), "vocab_size", None)
            if ref_rows is not None and ref_rows < rows_needed:
                raise UsageError(
                    f"--precomputed_ref_logps with a vocabulary that grows to {rows_needed} tokens "
                    f"(--add_tokens or the data's added tokens): the file was computed by "
                    f"{self.ref_model_path} ({ref_rows} rows) without the new rows, so its "
                    f"log-probs are not the starting policy's; drop --precomputed_ref_logps (the "
                    f"reference is then the starting model, resized like the policy)")
            return
        if use_lora and not self.args.ref_model_path:
            self.use_adapter_off = True   # peft keeps the new rows' start (trainable tokens /
            return                        # modules_to_save hold the trained copy)
        from trainer.model import embedding_rows, load_training_model
        ref = load_training_model(self.ref_model_path, from_scratch=False, dtype=self.dtype,
                                  attn_implementation=self.attn)
        if embedding_rows(ref) < rows_needed:
            if self.args.ref_model_path and not _same_model(self.args.ref_model_path,
                                                            self.args.model_path):
                raise UsageError(
                    f"--ref_model_path {self.args.ref_model_path} has {embedding_rows(ref)} token "
                    f"rows but the training vocabulary grows to {rows_needed} (--add_tokens or "
                    f"the data's added tokens), and its new rows could not start as the policy's "
                    f"(which come from {self.args.model_path}); pass a reference that already has "
                    f"{rows_needed} rows, or drop --ref_model_path (the default reference, the "
                    f"starting model, is resized exactly like the policy)")
            from trainer import vocab
            vocab.grow_embeddings(ref, rows_needed, init=vocab_plan.init, why=vocab_plan.why,
                                  model_tokenizer=vocab_plan.model_tokenizer, tokenizer=tokenizer,
                                  zero3=zero3, log_it=False)
        ref.requires_grad_(False)
        ref.eval()
        if zero3:  # partitioned like the policy; no optimizer (as TRL's prepare_deepspeed)
            import copy

            import deepspeed
            cfg = copy.deepcopy(ds_config)
            for key in ("optimizer", "scheduler"):
                cfg.pop(key, None)
            cfg.get("zero_optimization", {}).pop("offload_optimizer", None)
            ref, *_ = deepspeed.initialize(model=ref, config=cfg)
            ref.eval()
        else:
            ref.to(self.info.device)
        self.ref_model = ref

    def _reference_logps(self, engine, inputs: dict, batch: dict, vocab: int) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].to(self.info.device).reshape(-1)  # c0 r0 c1 r1 ...
        with torch.no_grad():
            if self.use_adapter_off:
                with _adapters_disabled(engine.module):
                    logits = engine.module(**inputs).logits
            else:
                logits = self.ref_model(**inputs).logits
                if logits.shape[-1] != vocab:  # another softmax: the log-probs would not compare
                    raise UsageError(f"the reference model {self.ref_model_path} has "
                                     f"{logits.shape[-1]} output rows, the policy {vocab}; pass a "
                                     f"--ref_model_path with the policy's vocabulary")
            sums, _ = logps_from_logits(logits, batch)
        return sums.double()

    def micro_losses(self, engine, batch: dict, *, nll_scale: float | None = None
                     ) -> dict[str, torch.Tensor]:
        """Per-pair losses of one micro-batch; `nll_scale` (orpo): global pairs / global chosen
        tokens (default: this micro-batch's)."""
        from trainer.data import model_inputs
        inputs = model_inputs(batch, self.attn, self.dtype, self.info.device)
        logits = engine(**inputs).logits
        sums, counts = logps_from_logits(logits, batch)
        nll = nll_tokens = None
        if self.s.objective == "orpo":
            nll, nll_tokens = chosen_nll_from_logits(logits, batch)
            if nll_scale is None:
                nll_scale = batch["num_pairs"] / max(batch["chosen_tokens"], 1)
        vocab = logits.shape[-1]
        del logits
        ref = self._reference_logps(engine, inputs, batch, vocab) if self.s.needs_reference else None
        out = pair_losses(self.s, chosen_logps=sums[0::2], rejected_logps=sums[1::2],
                          chosen_lens=counts[0::2], rejected_lens=counts[1::2],
                          ref_chosen_logps=None if ref is None else ref[0::2].to(sums.dtype),
                          ref_rejected_logps=None if ref is None else ref[1::2].to(sums.dtype),
                          chosen_nll=nll, nll_scale=nll_scale)
        if nll_tokens is not None:
            out["nll_tokens"] = nll_tokens
        return out

    def train_step(self, engine, micro_batches: list[dict]) -> tuple[float, int]:
        """One optimizer step; returns (global mean per-pair loss, global pair count)."""
        from trainer.dist import all_reduce_sum
        local_pairs = sum(b["num_pairs"] for b in micro_batches)
        local_tokens = sum(b["chosen_tokens"] for b in micro_batches)
        global_pairs, global_tokens = all_reduce_sum([local_pairs, local_tokens], self.info.device)
        scale = self.info.world_size / max(global_pairs, 1.0)  # DeepSpeed averages over ranks
        nll_scale = max(global_pairs, 1.0) / max(global_tokens, 1.0)  # orpo: token mean, global
        sums = dict.fromkeys(("loss",) + METRIC_NAMES, 0.0)
        per_source = np.zeros_like(self.source_window)
        for batch in micro_batches:
            out = self.micro_losses(engine, batch, nll_scale=nll_scale)
            engine.backward(out["loss"].sum() * scale, scale_wrt_gas=False)
            engine.step()
            for k, v in metric_sums(out).items():
                sums[k] += v
            if self.source_names:
                src = batch["pair_sources"]
                k = len(self.source_names)
                per_source[0] += np.bincount(src, weights=out["loss"].detach().double().cpu()
                                             .numpy(), minlength=k)
                per_source[1] += np.bincount(src, minlength=k)
        keys = list(sums)
        reduced = all_reduce_sum([sums[k] for k in keys] + per_source.ravel().tolist(),
                                 self.info.device)
        totals = dict(zip(keys, reduced[:len(keys)]))
        self.source_window += np.asarray(reduced[len(keys):]).reshape(per_source.shape)
        n = max(global_pairs, 1.0)
        self.last = {k: totals[k] / n for k in METRIC_NAMES}
        for k in METRIC_NAMES:
            self.window[k] += totals[k]
        self.window["pairs"] += global_pairs
        return totals["loss"] / n, int(global_pairs)

    def window_metrics(self) -> dict[str, float]:
        """Means over the pairs since the last logging step (then reset)."""
        n = max(self.window["pairs"], 1.0)
        out = {k: self.window[k] / n for k in METRIC_NAMES}
        out["pairs_per_step"] = self.window["pairs"]
        self.window = dict.fromkeys(self.window, 0.0)
        for name, loss_sum, pairs in zip(self.source_names, *self.source_window):
            out[f"loss/{name}"] = loss_sum / pairs if pairs else None
            out[f"pairs/{name}"] = int(pairs)
        self.source_window[:] = 0
        return out

    def evaluate(self, engine, step: int) -> dict:
        from trainer.data import eval_sample_count, eval_shard
        from trainer.dist import all_reduce_sum
        src, mbs = self.eval_source, self.args.micro_batch_size
        shard = eval_shard(eval_sample_count(len(src), self.args.eval_max_samples),
                           self.info.rank, self.info.world_size, mbs)
        sums = dict.fromkeys(("loss",) + METRIC_NAMES, 0.0)
        orpo_parts = [0.0, 0.0, 0.0]  # odds-ratio loss sum, chosen NLL sum, chosen tokens
        pairs = 0
        engine.eval()
        with torch.no_grad():
            for k in range(0, len(shard.indices), mbs):
                idx = shard.indices[k:k + mbs]
                batch = collate_pairs([src[int(i)] for i in idx], pad_id=self.pad_id,
                                      flatten=self.flatten)
                out = self.micro_losses(engine, batch)
                # zero-weight padding samples keep the ranks in lockstep but do not count
                w = np.repeat(shard.weights[k:k + mbs],
                              [src.pair_start[i + 1] - src.pair_start[i] for i in idx])
                keep = torch.from_numpy(w > 0).to(out["loss"].device)
                out = {key: v[keep] for key, v in out.items()}
                pairs += int(keep.sum())
                for key, v in metric_sums(out).items():
                    sums[key] += v
                if "nll" in out:
                    for j, key in enumerate(("odds_ratio_loss", "nll", "nll_tokens")):
                        orpo_parts[j] += float(out[key].sum())
        engine.train()
        keys = list(sums)
        totals = all_reduce_sum([sums[k] for k in keys] + [pairs] + orpo_parts, self.info.device)
        orpo_parts = totals[-3:]
        totals = totals[:-3]
        n = max(totals[-1], 1.0)
        loss = totals[0] / n
        if self.s.objective == "orpo":  # the NLL term: a token mean over the whole eval set
            loss = orpo_parts[0] / n + orpo_parts[1] / max(orpo_parts[2], 1.0)
            if self.s.sft_weight:
                loss += self.s.sft_weight * -(totals[keys.index("logps/chosen")] / n)
        result = {"step": step, "eval_loss": loss, "eval_pairs": int(totals[-1])}
        for key, v in zip(keys[1:], totals[1:-1]):
            result[f"eval_{key}"] = v / n
        return result


def _same_model(a: str, b: str) -> bool:
    """The same directory, or identical weight and config files."""
    return Path(a).resolve() == Path(b).resolve() or model_fingerprint(a) == model_fingerprint(b)


@contextlib.contextmanager
def _adapters_disabled(model) -> Iterator[None]:
    """peft's `disable_adapter()`: the base model's forward, same parameters, no copy."""
    if not hasattr(model, "disable_adapter"):
        raise UsageError("the reference is 'the policy without its adapters', but the model has no "
                         "LoRA adapters; pass --ref_model_path")
    from trainer.quantize import eval_mode_on_training_kernels
    # eval mode: no dropout, so the reference is deterministic (as a separate reference model,
    # which is in eval mode); quantised layers stay on the policy's kernels (the same numerics)
    with eval_mode_on_training_kernels(model), model.disable_adapter():
        yield


def plot_preference_curves(history: list[dict], eval_history: list[dict], path: Path) -> None:
    """rewards/chosen, rewards/rejected, margins and accuracies per logging step (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [h for h in history if "rewards/chosen" in h]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [h["step"] for h in rows]
    axes[0].plot(steps, [h["loss"] for h in rows], label="train loss")
    ev = [e for e in eval_history if "eval_loss" in e]
    if ev:
        axes[0].plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o-", label="eval loss")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        axes[1].plot(steps, [np.nan if h[key] is None else h[key] for h in rows], label=key)
    if rows and "rewards/accuracies" in rows[0]:   # kto logs no accuracies (as TRL's KTO)
        axes[2].plot(steps, [h["rewards/accuracies"] for h in rows], label="train")
    elif rows and "kl" in rows[0]:
        axes[2].plot(steps, [h["kl"] for h in rows], label="kl (z0)")
    if ev and "eval_rewards/accuracies" in ev[0]:
        axes[2].plot([e["step"] for e in ev], [e["eval_rewards/accuracies"] for e in ev], "o-",
                     label="eval")
    third = "kl" if rows and "kl" in rows[0] else "rewards/accuracies"
    for ax, title in zip(axes, ("loss", "rewards", third)):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
