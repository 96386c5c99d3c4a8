"""The training recipe (torchtune's word): `Trainer` builds everything before step 1 as a sequence
of `_setup_*` steps that each return what they build, then `run()` is the loop. The CLI around it
is trainer/train.py (argument checks first, so a bad flag exits before torch is imported).

Loss: sum of per-token cross-entropies over the loss tokens of the whole global batch (all
micro-steps and ranks) divided by the global loss-token count, all-reduced before the first backward.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# Per-step code (train_step, evaluate, the loop) uses these: imported once here, not per call.
# deepspeed and transformers stay inside the set-up steps that use them once.
import numpy as np
import torch
from tqdm import tqdm

from shardfmt import vocab_hash
from shardfmt.errors import UsageError as ShardfmtUsageError
from shardfmt.preference import sequence_lengths
from trainer import checkpoint as ckpt_mod
from trainer import ds_config as dsc
from trainer import model as mdl
from trainer import quantize, vocab
from trainer.args import TrainArgs
from trainer.data import (FLATTENED_ATTENTION, IGNORE_INDEX, DataSources, build_train_sampler,
                          count_loss_tokens, eval_batches, eval_sample_count, eval_shard,
                          model_inputs, open_sources, train_loader)
from trainer.dist import DistInfo, all_reduce_sum, init_distributed
from trainer.dtypes import precision_name
from trainer.errors import ReportWriteError, UsageError
from trainer.lora import resolve_lora_targets
from trainer.loss import forward_loss_sum, fused_head_problem
from trainer.metrics import Reporter, guarded
from trainer.preference import (ObjectiveSettings, PreferenceRun, check_datasets, pair_loader,
                                plot_preference_curves)
from trainer.rope import apply_rope_scaling, rope_summary

log = logging.getLogger("trainer")


@dataclass
class RunState:
    step: int = 0
    consumed_samples: int = 0
    loss_history: list[dict] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    source_samples: list[int] = field(default_factory=list)  # samples seen per --data_path source


class TokenizerSetup(NamedTuple):
    """What `_setup_tokenizer` builds."""
    tokenizer: object | None          # None: no tokenizer loads (--from_scratch from a bare config)
    vocab_plan: vocab.VocabPlan
    new_token_ids: list[int]          # ids added for the manifest's tokens and --add_tokens
    hashes: list[str]                 # vocab hashes the data may have been encoded with
    pad_id: int


class DeepSpeedSetup(NamedTuple):
    """What `_setup_ds_config` builds."""
    config: dict                      # the resolved DeepSpeed config ("auto" filled in)
    opt_plan: dsc.OptimizerPlan
    sched_plan: dsc.SchedulerPlan
    zero3: bool


class ModelSetup(NamedTuple):
    """What `_setup_model` builds."""
    model: torch.nn.Module
    resize: object | None             # trainer/vocab.py's record of the embedding resize
    lora_settings: dict | None
    lora_new_rows: object | None      # LoRA: how the new embedding rows are trained


def total_steps_for(args: TrainArgs, num_samples: int, global_batch: int) -> int:
    """--max_steps, or floor(max_epochs * samples / global batch) (the last partial batch dropped)."""
    if args.max_steps is not None:
        return args.max_steps
    return max(1, int(args.max_epochs * num_samples // global_batch))


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def _described(*data: DataSources | None) -> tuple[list[dict], list[str]]:
    """(manifests, paths) of every shardfmt source. Megatron data has no manifest (no tokenizer
    identity to check: only its id range is, against the embedding)."""
    pairs = [(p, m) for d in data if d is not None for src in d.sources
             for p, m in zip(src.paths, src.manifests)]
    return [m for _, m in pairs], [p for p, _ in pairs]


# ---------------------------------------------------------------------------------- set-up steps
def _setup_distributed() -> DistInfo:
    return init_distributed()


def _setup_seed(seed: int) -> None:
    """Same seed on every rank: identical random init (--from_scratch, LoRA, new embedding rows)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_checkpoint_lookup(load_ckpt_path: str | None) -> tuple[Path | None, dict | None]:
    """(checkpoint dir, its trainer_state.json) to resume from, or (None, None)."""
    if not load_ckpt_path:
        return None, None
    ckpt = ckpt_mod.resolve_checkpoint(load_ckpt_path)
    return ckpt, ckpt_mod.read_state(ckpt)


def _setup_data(args: TrainArgs) -> tuple[DataSources, DataSources | None]:
    """Train and eval sources (any kind; several, maybe weighted: trainer/data.py)."""
    train = open_sources(args.data_path, flag="--data_path")
    evaluation = open_sources(args.eval_data_path, flag="--eval_data_path") \
        if args.eval_data_path else None
    return train, evaluation


def resume_mismatch_message(ckpt: Path, ckpt_state: dict, args: TrainArgs, err: Exception) -> str:
    """Why this run cannot continue the checkpoint's sample order, naming the flags that differ
    from the checkpoint's run (its trainer_state.json records them) and the two ways out."""
    saved = ckpt_state.get("args", {})
    fixes = []
    if "seed" in saved and saved["seed"] != args.seed:
        fixes.append(f"--seed {saved['seed']}")
    if "shuffle_data" in saved and saved["shuffle_data"] != args.shuffle_data:
        fixes.append("--shuffle_data" if saved["shuffle_data"] else "--no-shuffle_data")
    if "data_path" in saved and (saved["data_path"] != args.data_path or not fixes):
        fixes.append("--data_path " + " ".join(map(str, saved["data_path"]))
                     + " (the same data, unchanged since the checkpoint)")
    return (f"--load_ckpt_path {ckpt}: this run's data order differs from the checkpoint's ({err}) "
            f"Resume with the checkpoint's {', '.join(fixes) or '--seed and --data_path'}, or "
            f"start a new run (without --load_ckpt_path).")


class Trainer:
    """Holds everything built before step 1; `run()` is the loop."""

    def __init__(self, args: TrainArgs):
        self.args = args
        self.info = info = _setup_distributed()
        _setup_seed(args.seed)
        self.ckpt, self.ckpt_state = _setup_checkpoint_lookup(args.load_ckpt_path)
        self.train_data, self.eval_data = _setup_data(args)
        self.train_ds = self.train_data.dataset
        self.eval_ds = self.eval_data.dataset if self.eval_data else None
        manifests, data_paths = _described(self.train_data, self.eval_data)
        self.prompt_format = ckpt_mod.prompt_format_of(manifests)
        base_config = mdl.load_model_config(args.model_path)
        (self.tokenizer, self.vocab_plan, self.new_token_ids, self.tokenizer_hashes,
         self.pad_id) = self._setup_tokenizer(manifests, data_paths, base_config)
        self.dtype = mdl.resolve_precision(args.precision)
        self.global_batch = args.micro_batch_size * args.gradient_accumulation_steps * info.world_size
        self.total_steps = total_steps_for(args, len(self.train_ds), self.global_batch)
        self.sampler = self._setup_sampler()  # before the model loads: a changed seed fails fast
        model_src = str(self.ckpt) if self.ckpt and not args.use_lora else args.model_path
        self.model_config = self._setup_model_config(model_src)
        self.attn = mdl.resolve_attn_implementation(args.attn_implementation, base_config)
        self.flatten = self.attn in FLATTENED_ATTENTION
        self.pref = self._setup_preference()  # before the model loads: a stale reference file fails fast
        self.ds_config, self.opt_plan, self.sched_plan, self.zero3 = self._setup_ds_config(base_config)
        self._hf_ds = self._setup_zero3_loading()  # kept alive: from_pretrained loads partitioned
        model, self.resize, self.lora_settings, self.lora_new_rows = self._setup_model(model_src)
        # preference objectives need per-sequence log-probs: full logits
        self.fused_loss = self._choose_fused_loss(model) and self.pref is None
        self.source_window: dict[str, list[float]] = {}  # per-source [loss sum, loss tokens]
        self.engine, self.scheduler = self._setup_engine(model)
        if self.pref is not None:
            self.pref.setup_reference(use_lora=args.use_lora, ds_config=self.ds_config, zero3=self.zero3,
                                      tokenizer=self.tokenizer, vocab_plan=self.vocab_plan)
        self.state = (self._restore() if self.ckpt is not None
                      else RunState(source_samples=[0] * len(self.train_data.sources)))
        self.run_dir = ckpt_mod.make_run_dir(args.output_path, args.save_name, args.no_timestamp, info)

    # ------------------------------------------------------------------------------ set-up parts
    def _setup_tokenizer(self, manifests: list[dict], data_paths: list[str],
                         base_config) -> TokenizerSetup:
        """The tokenizer (from the checkpoint on resume: it holds the added tokens), grown by the
        manifests' added tokens and --add_tokens, checked against the data; the vocab plan."""
        a = self.args
        if self.ckpt and _has_tokenizer_files(self.ckpt):
            source, flag = self.ckpt, "--load_ckpt_path"
        elif a.tokenizer_path:
            source, flag = a.tokenizer_path, "--tokenizer_path"
        else:  # the model's own, if it has one (None and a warning if not)
            source, flag = a.model_path, None
        tokenizer = mdl.load_training_tokenizer(source, flag=flag)
        plan = vocab.plan_vocab(
            model_path=a.model_path, tokenizer_path=a.tokenizer_path, tokenizer=tokenizer,
            tokenizer_source=str(source), model_vocab_size=getattr(base_config, "vocab_size", None),
            requested_init=a.new_token_init, from_scratch=a.from_scratch)
        if tokenizer is None:
            if a.add_tokens:
                raise UsageError(f"--add_tokens needs a tokenizer, but none loads from {source}; "
                                 f"pass --tokenizer_path or save one beside --model_path")
            return TokenizerSetup(None, plan, [], [], 0)
        # accepted: the tokenizer as loaded, + manifest tokens, + --add_tokens, and on resume
        # whatever the original run accepted (the checkpoint's tokenizer already has them all)
        loaded_len = len(tokenizer)
        hashes = {vocab_hash(tokenizer.get_vocab())}
        hashes |= set((self.ckpt_state or {}).get("tokenizer_hashes", []))
        new_ids = mdl.add_manifest_tokens(tokenizer, mdl.manifest_added_tokens(manifests))
        hashes.add(vocab_hash(tokenizer.get_vocab()))
        new_ids += mdl.add_special_tokens(tokenizer, a.add_tokens)
        hashes.add(vocab_hash(tokenizer.get_vocab()))
        mdl.check_tokenizer_matches(tokenizer, manifests, data_paths, hashes,
                                    a.ignore_tokenizer_mismatch, loaded_len=loaded_len,
                                    source=str(source))
        pad = tokenizer.pad_token_id
        return TokenizerSetup(tokenizer, plan, new_ids, sorted(hashes),
                              0 if pad is None else int(pad))

    def _setup_preference(self):
        """--objective dpo|ipo|orpo|simpo: the PreferenceRun (trainer/preference.py), else None.
        Either way the data must be of the objective's kind."""
        a = self.args
        check_datasets(a.objective, {"--data_path": self.train_data.sources,
                                     "--eval_data_path": self.eval_data.sources if self.eval_data else []})
        if a.objective == "sft":
            return None
        from trainer.kto import KtoRun
        return (KtoRun if a.objective == "kto" else PreferenceRun)(
            ObjectiveSettings(a.objective, beta=a.beta, label_smoothing=a.label_smoothing,
                              simpo_gamma=a.simpo_gamma, orpo_alpha=a.orpo_alpha,
                              sft_weight=a.sft_weight, desirable_weight=a.kto_desirable_weight,
                              undesirable_weight=a.kto_undesirable_weight),
            train_ds=self.train_ds, eval_ds=self.eval_ds, args=a, info=self.info, dtype=self.dtype,
            attn=self.attn, flatten=self.flatten, pad_id=self.pad_id, train_sources=self.train_data)

    def _setup_ds_config(self, base_config) -> DeepSpeedSetup:
        """The DeepSpeed config with "auto" filled from the flags, and the optimizer/LR plans."""
        a, info = self.args, self.info
        raw, cfg_path = dsc.read_config(a)
        values = dsc.auto_values(a, world_size=info.world_size, precision=precision_name(self.dtype),
                                 hidden_size=int(getattr(base_config, "hidden_size", 1024)))
        config = dsc.resolve_config(raw, cfg_path, values)
        opt_plan = dsc.plan_optimizer(raw, cfg_path, a, cpu_offload=dsc.optimizer_offloaded(config))
        sched_plan = dsc.plan_scheduler(raw, cfg_path, a, total_steps=self.total_steps, lr=opt_plan.lr)
        if info.is_main:
            log.info("%s", opt_plan.describe())
            log.info("%s", sched_plan.describe())
        zero3 = dsc.zero_stage_of(config) == 3
        if zero3 and a.quantization:
            raise UsageError(f"--quantization {a.quantization} with the ZeRO-3 config {cfg_path}: "
                             f"{quantize.ZERO3_REFUSAL}")
        return DeepSpeedSetup(config, opt_plan, sched_plan, zero3)

    def _setup_zero3_loading(self):
        """ZeRO-3: transformers' HfDeepSpeedConfig, alive while from_pretrained runs, makes it load
        the weights partitioned. None otherwise."""
        if not self.zero3:
            return None
        from transformers.integrations import HfDeepSpeedConfig
        return HfDeepSpeedConfig(self.ds_config)

    def _setup_model_config(self, model_src: str):
        """--rope_scaling applied to the config of the model being loaded (None: load as saved).
        A checkpoint saved with the same scaling already holds it and is loaded as is."""
        a = self.args
        if not a.rope_scaling:
            return None
        config = mdl.load_model_config(model_src)
        current = rope_summary(config) or {}
        if current.get("rope_type") == a.rope_scaling and current.get("factor") == a.rope_factor:
            return config
        config = apply_rope_scaling(config, kind=a.rope_scaling, factor=a.rope_factor,
                                    original_max_positions=a.original_max_positions)
        if self.info.is_main:
            log.info("--rope_scaling %s x%g: rope_parameters %s, max_position_embeddings %d",
                     a.rope_scaling, a.rope_factor, rope_summary(config),
                     config.max_position_embeddings)
        return config

    def _setup_model(self, model_src: str) -> ModelSetup:
        """Load (maybe quantised), grow the embeddings to the tokenizer, check the data fits,
        gradient checkpointing, LoRA (new or from the checkpoint)."""
        a, info = self.args, self.info
        model = mdl.load_training_model(
            model_src, from_scratch=a.from_scratch and self.ckpt is None, dtype=self.dtype,
            attn_implementation=self.attn, config=self.model_config,
            load_kwargs=quantize.load_kwargs(a.quantization, self.dtype, info.device))
        resize = None
        if self.tokenizer is not None:
            resize = vocab.grow_embeddings(
                model, len(self.tokenizer), init=self.vocab_plan.init, why=self.vocab_plan.why,
                model_tokenizer=self.vocab_plan.model_tokenizer, tokenizer=self.tokenizer,
                zero3=self.zero3, log_it=info.is_main)
        self._check_data(model)
        if a.quantization:  # freezes the base; gradient checkpointing set up here too
            model = quantize.prepare_for_training(model, gradient_checkpointing=a.gradient_checkpointing)
        elif a.gradient_checkpointing:
            mdl.enable_gradient_checkpointing(model, a.use_lora)
        if not a.use_lora:
            return ModelSetup(model, resize, None, None)
        settings = resolve_lora_targets(model, mdl.lora_settings(a.lora_config_path), zero3=self.zero3)
        new_rows = None
        if self.ckpt:
            model = mdl.load_lora(model, str(self.ckpt))
        else:  # LoRA trains the new rows unless the config says not
            new_row_ids = vocab.new_row_ids(self.tokenizer, base_len=self.vocab_plan.base_len,
                                            added_ids=self.new_token_ids) \
                if self.tokenizer is not None else []
            settings, new_rows = vocab.new_row_lora_settings(
                model, settings, new_row_ids, user_config=bool(a.lora_config_path), zero3=self.zero3)
            if new_rows and info.is_main:
                log.info("%s", new_rows)
            model = mdl.apply_lora(model, settings, [], zero3=self.zero3)
        if info.is_main:
            model.print_trainable_parameters()
        return ModelSetup(model, resize, settings, new_rows)

    def _check_data(self, model) -> None:
        rows = mdl.embedding_rows(model)
        for flag, ds in (("--data_path", self.train_ds), ("--eval_data_path", self.eval_ds)):
            if ds is None:
                continue
            lengths = ds.sample_lengths()
            if self.args.objective != "sft":  # pairs: positions restart at every sequence
                lengths = sequence_lengths(ds)
            mdl.check_data_fits_model(max_token_id=ds.max_token_id,
                                      max_length=int(lengths.max()) if len(lengths) else 0,
                                      embedding_rows=rows, max_positions=mdl.max_positions(model),
                                      flag=flag)

    def _choose_fused_loss(self, model) -> bool:
        if not self.args.fused_loss:
            return False
        problem = fused_head_problem(model, zero3=self.zero3)
        if problem and self.info.is_main:  # a documented fallback, not a fault: one info line
            log.info("--fused_loss: computing the loss from full logits instead, because %s",
                     problem)
        return problem is None

    def _setup_sampler(self):
        """The global sample order (seed, shuffle, data sizes and weights); on resume it must be
        the checkpoint's, else the saved position would name other samples (a UsageError)."""
        args = self.args
        saved = (self.ckpt_state or {}).get("sampler")
        sampler = build_train_sampler(self.train_data, global_batch=self.global_batch,
                                      seed=args.seed, shuffle=args.shuffle_data, saved_state=saved)
        if self.ckpt is not None:
            try:
                sampler.check_compatible(saved)
            except ShardfmtUsageError as err:
                raise UsageError(resume_mismatch_message(self.ckpt, self.ckpt_state, args, err)) \
                    from None
        return sampler

    def _setup_engine(self, model):
        """(DeepSpeed engine, LR scheduler): the optimizer and schedule the plans describe."""
        import deepspeed
        optimizer, scheduler = dsc.build_optimizer_and_scheduler(model, self.opt_plan, self.sched_plan)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=self.ds_config)
        return engine, scheduler

    def _restore(self) -> RunState:
        """Resume: engine (or LR position), RNG streams; returns the run state to continue from."""
        st, ckpt, info = self.ckpt_state, self.ckpt, self.info
        has_optimizer = (ckpt / ckpt_mod.DS_DIR / ckpt_mod.DS_TAG).is_dir()
        universal = bool(self.ds_config.get("checkpoint", {}).get("load_universal", False))
        if has_optimizer and st["world_size"] != info.world_size and not universal:
            raise UsageError(
                f"--load_ckpt_path {ckpt}: its optimizer state was saved by {st['world_size']} ranks "
                f"and ZeRO shards cannot be loaded by {info.world_size}. Either relaunch with "
                f"{st['world_size']} ranks; or convert it with DeepSpeed's ds_to_universal.py "
                f"(--input_folder {ckpt / ckpt_mod.DS_DIR / ckpt_mod.DS_TAG}) and add \"checkpoint\": "
                f"{{\"load_universal\": true}} to the DeepSpeed config; or move {ckpt / ckpt_mod.DS_DIR} "
                f"away to resume weights + data position + LR schedule with fresh optimizer moments.")
        if has_optimizer:
            self.engine.load_checkpoint(str(ckpt / ckpt_mod.DS_DIR), tag=ckpt_mod.DS_TAG,
                                        load_module_strict=not self.args.use_lora,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)
        else:
            dsc.set_schedule_position(self.scheduler, st["step"])  # LR = schedule(step), never restarted
            if info.is_main:
                bar = "!" * 100
                log.warning("\n%s\nRESUMING WITHOUT OPTIMIZER STATE: %s has no DeepSpeed engine "
                            "checkpoint (train with --save_optimizer). Weights, data position and LR "
                            "schedule (step %d) are restored; optimizer moments start from zero.\n%s",
                            bar, ckpt, st["step"], bar)
        if st["world_size"] != info.world_size and info.is_main:
            log.warning("resuming a %d-rank run on %d ranks: the data order continues exactly; the "
                        "global batch is now %d (was %d)", st["world_size"], info.world_size,
                        self.global_batch, st.get("global_batch", -1))
        if st.get("total_steps") not in (None, self.total_steps) and info.is_main:
            log.warning("total steps changed from %s to %d: the LR schedule changes shape",
                        st.get("total_steps"), self.total_steps)
        if not ckpt_mod.load_rng(ckpt, info.rank) and info.is_main:
            log.warning("no RNG state for rank %d in %s; dropout streams differ from the "
                        "uninterrupted run", info.rank, ckpt)
        return RunState(step=st["step"], consumed_samples=st["consumed_samples"],
                        loss_history=list(st.get("loss_history", [])),
                        eval_history=list(st.get("eval_history", [])),
                        source_samples=list(st.get("source_samples")
                                            or [0] * len(self.train_data.sources)))

    # ------------------------------------------------------------------------------ the loop
    def train_step(self, micro_batches: list[dict]) -> tuple[float, int]:
        """One optimizer step over `gas` micro-batches; returns (global mean loss, global loss tokens).
        With several sources, also adds this step's per-source sums to `self.source_window`."""
        info, engine = self.info, self.engine
        if self.pref is not None:  # per-pair losses over the global number of pairs
            return self.pref.train_step(engine, micro_batches)
        local_count = sum(count_loss_tokens(b) for b in micro_batches)
        (global_count,) = all_reduce_sum([local_count], info.device)
        # DeepSpeed averages gradients over ranks; scale_wrt_gas=False stops the 1/gas division.
        scale = info.world_size / max(global_count, 1.0)
        local_sum = 0.0
        num_sources = len(self.train_data.sources)
        per_source = torch.zeros(num_sources, dtype=torch.float64) if num_sources > 1 else None
        for batch in micro_batches:
            loss_sum = forward_loss_sum(engine, model_inputs(batch, self.attn, self.dtype, info.device),
                                        batch["labels"].to(info.device), fused=self.fused_loss,
                                        token_groups=batch.get("source_ids"), group_sums=per_source)
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            engine.step()
            local_sum += float(loss_sum.detach())
        (global_sum,) = all_reduce_sum([local_sum], info.device)
        if per_source is not None:
            self._add_source_stats(micro_batches, per_source)
        return global_sum / max(global_count, 1.0), int(global_count)

    def _add_source_stats(self, micro_batches: list[dict], loss_sums) -> None:
        """All-reduce this step's per-source loss sums, loss tokens and samples into the window."""
        k = len(self.train_data.sources)
        tokens, samples = np.zeros(k), np.zeros(k)
        for b in micro_batches:
            src = b["source_ids"][b["labels"] != IGNORE_INDEX]
            tokens += np.bincount(src.numpy(), minlength=k)
            samples += np.bincount(b["source_samples"], minlength=k)
        totals = all_reduce_sum(loss_sums.tolist() + tokens.tolist() + samples.tolist(),
                                self.info.device)
        for name, i in zip(self.train_data.names, range(k)):
            w = self.source_window.setdefault(name, [0.0, 0.0])
            w[0] += totals[i]
            w[1] += totals[k + i]
            self.state.source_samples[i] += int(round(totals[2 * k + i]))

    def source_metrics(self) -> dict:
        """Per-source loss (over the logging window), samples seen and epochs, for the log."""
        out = {}
        for i, (name, size) in enumerate(zip(self.train_data.names, self.train_data.sizes)):
            loss_sum, count = self.source_window.get(name, (0.0, 0.0))
            out[f"loss/{name}"] = loss_sum / count if count else None
            out[f"loss_tokens/{name}"] = int(count)
            out[f"samples_seen/{name}"] = self.state.source_samples[i]
            out[f"epoch/{name}"] = self.state.source_samples[i] / size
        self.source_window = {}
        return out

    def evaluate(self) -> dict:
        """Loss over every --eval_data_path source; with several, also each source's own loss
        (`eval_loss/<name>`). The overall eval_loss is over all loss tokens, or with weights
        (`0.5 A 0.5 B`) the weighted mean of the sources' losses."""
        info, engine, data, a = self.info, self.engine, self.eval_data, self.args
        if self.pref is not None:
            return self.pref.evaluate(engine, self.state.step)
        t0 = time.perf_counter()
        shards = [eval_shard(self.num_eval_samples(source), info.rank, info.world_size,
                             a.micro_batch_size) for source in data.sources]
        sums = []
        engine.eval()
        bar = tqdm(total=sum(-(-len(sh.indices) // a.micro_batch_size) for sh in shards),
                   desc="eval", leave=False, dynamic_ncols=True, mininterval=1.0, position=1,
                   disable=not info.is_main)
        with torch.no_grad():
            for source, shard in zip(data.sources, shards):
                total, count = 0.0, 0
                for batch in eval_batches(source, shard, micro_batch_size=a.micro_batch_size,
                                          pad_id=self.pad_id, flatten=self.flatten):
                    total += float(forward_loss_sum(
                        engine, model_inputs(batch, self.attn, self.dtype, info.device),
                        batch["labels"].to(info.device), fused=self.fused_loss))
                    count += count_loss_tokens(batch)
                    bar.update(1)
                sums += [total, count]
        bar.close()
        engine.train()
        sums = all_reduce_sum(sums, info.device)
        losses = [t / max(c, 1.0) for t, c in zip(sums[0::2], sums[1::2])]
        counts = [int(c) for c in sums[1::2]]
        if data.weights is not None:
            loss = sum(w * l for w, l in zip(data.weights, losses))
        else:
            loss = sum(sums[0::2]) / max(sum(counts), 1.0)
        result = {"step": self.state.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                  "eval_loss_tokens": sum(counts),
                  "eval_samples": sum(self.num_eval_samples(s) for s in data.sources),
                  "eval_time_s": round(time.perf_counter() - t0, 3)}
        if len(data.sources) > 1:
            for name, l, c in zip(data.names, losses, counts):
                result[f"eval_loss/{name}"] = l
                result[f"eval_loss_tokens/{name}"] = c
        return result

    def num_eval_samples(self, source) -> int:
        """The first --eval_max_samples samples of one eval source (all when 0)."""
        return eval_sample_count(len(source), self.args.eval_max_samples)

    def trainer_state(self) -> dict:
        s = self.state
        return {"step": s.step, "epoch": s.consumed_samples / len(self.train_ds),
                "consumed_samples": s.consumed_samples, "source_samples": s.source_samples,
                "sampler": self.sampler.state_dict(s.consumed_samples),
                "world_size": self.info.world_size, "global_batch": self.global_batch,
                "total_steps": self.total_steps, "loss_history": s.loss_history,
                "eval_history": s.eval_history, "args": self.args.to_dict(),
                "resumed_from": str(self.ckpt) if self.ckpt else None,
                "tokenizer_hashes": self.tokenizer_hashes,
                "has_optimizer_state": self.args.save_optimizer}

    def resolved_config(self) -> dict:
        return {"args": self.args.to_dict(), "deepspeed_config": self.ds_config,
                "world_size": self.info.world_size, "global_batch": self.global_batch,
                "total_steps": self.total_steps, "precision": precision_name(self.dtype),
                "attn_implementation": self.attn,
                "loss": "fused head" if self.fused_loss else "full logits",
                "objective": self.args.objective,
                "reference": self.pref.reference_source() if self.pref else None, "zero_stage": 3 if self.zero3 else
                self.ds_config.get("zero_optimization", {}).get("stage"),
                "optimizer": dataclasses.asdict(self.opt_plan),
                "lr_schedule": dataclasses.asdict(self.sched_plan),
                "lora": self.lora_settings, "quantization": self.args.quantization,
                "rope_parameters": self._rope_record(), "added_token_ids": self.new_token_ids,
                "tokenizer_len": len(self.tokenizer) if self.tokenizer is not None else None,
                "vocab": self.vocab_plan.record(self.tokenizer, self.resize, self.lora_new_rows)}

    def _rope_record(self) -> dict | None:
        return rope_summary(self.model_config) if self.model_config is not None else None

    def save(self) -> Path:
        if self.pref is not None:
            path = self.run_dir / "preference_curves.png"

            def plot() -> None:
                if self.info.is_main:
                    guarded(path, lambda: plot_preference_curves(
                        self.state.loss_history, self.state.eval_history, path))
            self._reported(plot)
        return ckpt_mod.save_checkpoint(engine=self.engine, tokenizer=self.tokenizer, run_dir=self.run_dir,
                               step=self.state.step, state=self.trainer_state(),
                               resolved=self.resolved_config(), info=self.info, zero3=self.zero3,
                               save_optimizer=self.args.save_optimizer, use_lora=self.args.use_lora,
                               save_total_limit=self.args.save_total_limit,
                               prompt_format=self.prompt_format)

    def _should_save(self, consumed_before: int) -> bool:
        a, n = self.args, len(self.train_ds)
        by_steps = a.save_steps and self.state.step % a.save_steps == 0
        by_epochs = a.save_epochs and (consumed_before // n) // a.save_epochs < (
            self.state.consumed_samples // n) // a.save_epochs
        return bool(by_steps or by_epochs)

    def run(self) -> RunState:
        a, info, st = self.args, self.info, self.state
        several = len(self.train_data.sources) > 1
        if self.pref is not None:  # preference pairs (trainer/preference.py)
            loader = pair_loader(self.pref.train_source, self.sampler, start=st.consumed_samples,
                                 rank=info.rank, world_size=info.world_size,
                                 micro_batch_size=a.micro_batch_size, pad_id=self.pad_id,
                                 flatten=self.flatten, num_workers=a.num_workers, seed=a.seed,
                                 collator=getattr(self.pref, "collator", None))  # kto's
        else:
            loader = train_loader(self.train_ds, self.sampler, start=st.consumed_samples,
                                  rank=info.rank, world_size=info.world_size,
                                  micro_batch_size=a.micro_batch_size, pad_id=self.pad_id,
                                  flatten=self.flatten, num_workers=a.num_workers, seed=a.seed,
                                  source_starts=self.train_data.starts if several else None)
        if info.is_main:
            log.info("run dir %s | world %d | global batch %d | steps %d..%d | %s %s | zero %s",
                     self.run_dir, info.world_size, self.global_batch, st.step, self.total_steps,
                     precision_name(self.dtype), self.attn, 3 if self.zero3 else 2)
        rep = self._reported(lambda: Reporter(
            self.run_dir, enabled=info.is_main, total_steps=self.total_steps, initial_step=st.step,
            trackers=a.report_to, run_name=a.save_name, config=self.resolved_config()))
        # from_pretrained returns the model in eval mode and DeepSpeed leaves the mode alone: without
        # this the run trained with dropout off, --gradient_checkpointing inert (transformers
        # checkpoints only in train mode) and bitsandbytes on its inference paths (LLM.int8's
        # int8 matmul; the 4-bit CPU repack, trainer/quantize.py), until the first eval's train()
        self.engine.train()
        try:  # the bar and the log file are closed on an error too, so the error line stands alone
            batches = iter(loader)
            window = {"loss_sum": 0.0, "count": 0, "tokens": 0, "loss_tokens": 0, "time": 0.0, "steps": 0}
            saved_at = -1
            while st.step < self.total_steps:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(a.gradient_accumulation_steps)]
                local_tokens = sum(b["num_tokens"] for b in micro)
                loss, count = self.train_step(micro)
                dt = time.perf_counter() - t0
                consumed_before = st.consumed_samples
                st.step += 1
                st.consumed_samples += self.global_batch
                lr = float(self.engine.get_lr()[0])
                st.loss_history.append({"step": st.step, "loss": loss, "lr": lr,
                                        **(self.pref.last if self.pref else {})})
                window["loss_sum"] += loss * count
                window["count"] += count
                window["tokens"] += local_tokens
                window["loss_tokens"] += count / info.world_size
                window["time"] += dt
                window["steps"] += 1
                rep.step(loss, lr, local_tokens / max(dt, 1e-9))
                if st.step % a.logging_steps == 0 or st.step == self.total_steps:
                    grad_norm = self.engine.get_global_grad_norm()
                    record = {"step": st.step, "epoch": st.consumed_samples / len(self.train_ds),
                              "loss": window["loss_sum"] / max(window["count"], 1), "lr": lr,
                              "grad_norm": None if grad_norm is None else float(grad_norm),
                              "loss_tokens_per_device": window["loss_tokens"] / window["steps"],
                              "tokens_per_sec_per_device": window["tokens"] / max(window["time"], 1e-9),
                              "samples_seen": st.consumed_samples,
                              **(self.source_metrics() if several and not self.pref else {}),
                              **(self.pref.window_metrics() if self.pref else {})}
                    self._reported(lambda: rep.log(record))
                    window = dict.fromkeys(window, 0)
                if self.eval_ds is not None and a.eval_steps and st.step % a.eval_steps == 0:
                    self._eval_and_log(rep)
                if self._should_save(consumed_before):
                    self.save()
                    saved_at = st.step
            if self.eval_ds is not None and not (a.eval_steps and st.step % a.eval_steps == 0):
                self._eval_and_log(rep)
            if saved_at != st.step:
                self.save()
        except BaseException:
            rep.close(quiet=True)  # the error on its way is the one to report
            raise
        self._reported(rep.close)
        return st

    def _reported(self, work):
        """`work()`, a rank-0 write of the log, trackers or a plot; a ReportWriteError on rank 0
        stops every rank at once (one all-reduce of "did it fail", only with several ranks), as
        a failed checkpoint save does: the others would otherwise wait for rank 0 forever."""
        error, result = None, None
        try:
            result = work()
        except ReportWriteError as e:
            error = e
        failed = all_reduce_sum([0.0 if error is None else 1.0], self.info.device)[0] \
            if self.info.world_size > 1 else 0.0
        if error is not None:
            raise error
        if failed:
            raise ReportWriteError("rank 0 failed writing the run's log, trackers or plots (its "
                                   "error line names the file and the fix)")
        return result

    def _eval_and_log(self, rep) -> None:
        result = self.evaluate()
        self.state.eval_history.append(result)
        self._reported(lambda: rep.log(result))
        if self.pref is not None and "eval_kl" in result:   # kto (trainer/kto.py)
            rep.write(f"step {result['step']}: eval loss {result['eval_loss']:.4f} kl "
                      f"{result['eval_kl']:.4f} rewards/chosen {result['eval_rewards/chosen']} "
                      f"rewards/rejected {result['eval_rewards/rejected']}")
            return
        if self.pref is not None:
            rep.write(f"step {result['step']}: eval loss {result['eval_loss']:.4f} reward accuracy "
                      f"{result['eval_rewards/accuracies']:.3f} margin "
                      f"{result['eval_rewards/margins']:.3f}")
            return
        rep.write(f"step {result['step']}: eval loss {result['eval_loss']:.4f} "
                  f"ppl {result['eval_ppl']:.2f} ({result['eval_samples']} samples, "
                  f"{result['eval_time_s']:.1f} s)")
