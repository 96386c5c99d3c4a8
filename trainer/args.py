"""Every flag of `trainer/train.py` as one typed dataclass, parsed and validated up front.

`parse_args(argv)` returns a `TrainArgs`; `validate_args(args)` returns the list of every problem
found (empty = fine); `parse_and_validate(argv)` exits with all problems at once. Nothing heavy
(torch, transformers, deepspeed) is imported here, so a wrong flag fails in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shardfmt.run_config import add_config_flag, parse_with_config
from trainer.errors import ConfigError

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa_varlen", "sdpa", "eager")
LR_SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "lion", "adamw8bit", "paged_adamw8bit", "lion8bit")  # *8bit: bitsandbytes
QUANTIZATIONS = ("4bit", "8bit")  # bitsandbytes NF4 + double quantisation / LLM.int8
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
REPORT_TO = ("tensorboard", "wandb", "mlflow")  # any subset; "none" = no tracker
NEW_TOKEN_INITS = ("auto", "mean", "decompose")
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto")  # trainer/preference.py, trainer/kto.py
BUNDLED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TrainArgs:
    # --- original llm-lite-trainer flags ---
    model_path: str = ""
    data_path: list[str] = field(default_factory=list)
    output_path: str = ""
    save_name: str = "run"
    max_epochs: float | None = None
    max_steps: int | None = None
    seed: int = 1234
    shuffle_data: bool = True
    load_ckpt_path: str | None = None
    deepspeed_config_path: str | None = None
    max_grad_norm: float = 1.0
    save_steps: int = 0
    save_epochs: int = 0
    save_optimizer: bool = False
    no_timestamp: bool = False
    use_lora: bool = False
    lora_config_path: str | None = None
    add_tokens: list[str] = field(default_factory=list)
    # --- added ---
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"
    eval_data_path: list[str] = field(default_factory=list)
    eval_steps: int = 0
    logging_steps: int = 10
    save_total_limit: int = 0
    report_to: list[str] = field(default_factory=list)
    from_scratch: bool = False
    zero_stage: int | None = None
    optimizer: str = "adamw"
    precision: str = "auto"
    num_workers: int = 1
    ignore_tokenizer_mismatch: bool = False
    fused_loss: bool = True
    # --- quantised LoRA and RoPE scaling (trainer/quantize.py, trainer/rope.py) ---
    quantization: str | None = None
    rope_scaling: str | None = None
    rope_factor: float | None = None
    original_max_positions: int | None = None
    tokenizer_path: str | None = None
    new_token_init: str = "auto"
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    adam_epsilon: float = 1e-8
    eval_max_samples: int = 0
    config: str | None = None
    # --- preference objectives (trainer/preference.py) ---
    objective: str = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_alpha: float = 0.1
    sft_weight: float = 0.0
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    ref_model_path: str | None = None
    precomputed_ref_logps: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def deepspeed_config_file(value: str | None) -> Path | None:
    """--deepspeed_config_path as a file: the path itself, else a bundled config of that name
    (`zero3_offload` or `zero3_offload.json` -> trainer/configs/zero3_offload.json)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file() or path.parent != Path("."):
        return path
    bundled = BUNDLED_CONFIG_DIR / (value if value.endswith(".json") else f"{value}.json")
    return bundled if bundled.is_file() else path


def _split_tokens(values: list[str] | None) -> list[str]:
    """`--add_tokens "<a>,<b>" "<c>"` -> ["<a>", "<b>", "<c>"] (commas or spaces separate)."""
    out: list[str] = []
    for v in values or []:
        out.extend(t for t in v.split(",") if t.strip())
    return [t.strip() for t in out]


def _add_float_flags(group, defaults: TrainArgs, flags: dict[str, str]) -> None:
    """`--NAME` (float, default: the TrainArgs field NAME) for each {NAME: help}."""
    for name, help_text in flags.items():
        group.add_argument(f"--{name}", type=float, default=getattr(defaults, name), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """Every flag has help; ArgumentDefaultsHelpFormatter appends "(default: X)" to each."""
    d = TrainArgs()
    p = argparse.ArgumentParser(
        prog="trainer/train.py",
        description="Train a causal LM on shardfmt datasets with DeepSpeed (full or LoRA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flag(p)
    g = p.add_argument_group("paths")
    g.add_argument("--model_path", required=True, default=argparse.SUPPRESS, help="(required) HF "
                   "model dir (weights+tokenizer, or only a config with --from_scratch)")
    g.add_argument("--data_path", nargs="+", required=True, default=argparse.SUPPRESS,
                   metavar="[WEIGHT] PATH",
                   help="(required) datasets: shardfmt dirs, Megatron .bin/.idx prefixes or dirs of "
                   "them. `A B`: end to end (a path given twice is read twice per epoch); "
                   "`0.7 A 0.3 B`: weighted mix, each source's share of every global batch within "
                   "one sample")
    g.add_argument("--eval_data_path", nargs="+", default=[], metavar="[WEIGHT] PATH",
                   help="eval datasets, same forms; several are evaluated and logged separately "
                   "(eval_loss/NAME), weights make eval_loss their weighted mean")
    g.add_argument("--output_path", required=True, default=argparse.SUPPRESS, help="(required) runs "
                   "go to OUTPUT/<timestamp>_<save_name>/")
    g.add_argument("--save_name", default=d.save_name, help="run name: the run dir's suffix and "
                   "the tracker run name")
    g.add_argument("--no_timestamp", action="store_true", help="run dir is OUTPUT/<save_name>/")
    g.add_argument("--load_ckpt_path", default=None, help="resume: a run dir or a checkpoint dir")
    g.add_argument("--deepspeed_config_path", default=None,
                   help="DeepSpeed JSON (HF/LLaMA-Factory style; \"auto\" values and optimizer/"
                   "scheduler sections are filled from the flags), or the name of a bundled one: "
                   "zero2, zero3, zero3_offload. None: bundled zero{--zero_stage}.json")
    g = p.add_argument_group("length of training")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--max_epochs", type=float, default=None, help="passes over --data_path (one of "
                   "--max_epochs/--max_steps is required)")
    x.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    g = p.add_argument_group("optimisation")
    g.add_argument("--micro_batch_size", type=int, default=d.micro_batch_size, help="samples per rank "
                   "per forward")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps,
                   help="micro-batches per optimizer step")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler,
                   help="after warmup: constant, or linear/cosine decay to 0 at the last step")
    _add_float_flags(g, d, {
        "learning_rate": "peak learning rate",
        "warmup_ratio": "fraction of the steps with linear warmup",
        "weight_decay": "decoupled weight decay of matrices (not biases/norms)",
        "adam_beta1": "beta1 of AdamW/Lion (None: 0.9)",
        "adam_beta2": "beta2 (None: 0.95 for AdamW, 0.99 for Lion)",
        "adam_epsilon": "AdamW epsilon",
        "max_grad_norm": "0 disables clipping"})
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="with ZeRO-Offload "
                   "(offload_optimizer to cpu) DeepSpeed's CPU Adam/Lion is used")
    g.add_argument("--zero_stage", type=int, choices=(2, 3), default=None, help="picks the bundled "
                   "config when --deepspeed_config_path is not given (None: 2)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    g.add_argument("--seed", type=int, default=d.seed, help="data order, init of new weights, "
                   "dropout")
    g.add_argument("--shuffle_data", action=argparse.BooleanOptionalAction, default=d.shuffle_data,
                   help="shuffle samples each epoch (a seeded permutation; --no-shuffle_data reads "
                   "them in order)")
    g.add_argument("--num_workers", type=int, default=d.num_workers, help="DataLoader workers")
    g = p.add_argument_group("model")
    g.add_argument("--from_scratch", action="store_true", help="random init from model_path's config")
    g.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default=d.attn_implementation,
                   help="auto: flash_attention_2 if installed on GPU, else sdpa_varlen when the "
                   "model supports it, else sdpa")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in "
                   "backward (less memory, ~30%% more compute)")
    g.add_argument("--fused_loss", action=argparse.BooleanOptionalAction, default=d.fused_loss,
                   help="compute the loss chunk by chunk from the last hidden states, only where a "
                   "label is (no B x L x V logits); models it cannot be exact for use full logits")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="load the base model in 4-bit NF4 (double quantisation) or 8-bit LLM.int8 "
                   "with bitsandbytes and train a LoRA on it (QLoRA; needs --use_lora). Compute dtype: "
                   "--precision")
    g.add_argument("--rope_scaling", choices=ROPE_SCALINGS, default=None,
                   help="scale RoPE for a longer context (written into every checkpoint's config)")
    g.add_argument("--rope_factor", type=float, default=None, help="--rope_scaling factor: the "
                   "context becomes factor x the model's (or --original_max_positions) positions")
    g.add_argument("--original_max_positions", type=int, default=None,
                   help="--rope_scaling: the context the model was pretrained with (default: its "
                   "max_position_embeddings)")
    g.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    g.add_argument("--lora_config_path", default=None, help="JSON: r, alpha, dropout, target_modules, "
                   "modules_to_save")
    g.add_argument("--add_tokens", nargs="*", default=[], help="special tokens to add (comma or space "
                   "separated); tokens in the dataset manifest are added too")
    g.add_argument("--tokenizer_path", default=None, help="the tokenizer the data was encoded "
                   "with, when it is not the model's; if it extends the model's tokenizer the "
                   "embeddings grow to it")
    g.add_argument("--new_token_init", choices=NEW_TOKEN_INITS, default=d.new_token_init,
                   help="new embedding rows: decompose = mean of the rows of the pieces the "
                   "model's tokenizer splits the token into; mean = mean of all rows; auto = "
                   "decompose when the model's own tokenizer is known, else mean")
    g.add_argument("--ignore_tokenizer_mismatch", action="store_true",
                   help="train even if the dataset was encoded with a different tokenizer")
    g = p.add_argument_group("objective (preference: trainer/preference.py)")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="sft: next-token loss on qa/chat/pretrain data; dpo|ipo|orpo|simpo: on "
                   "preference pairs (encoder --encode_type preference); kto: on unpaired "
                   "desirable/undesirable examples (encoder --encode_type kto)")
    _add_float_flags(g, d, {
        "beta": "dpo/ipo/simpo/kto temperature (TRL's beta; IPO's tau)",
        "label_smoothing": "dpo/simpo: probability that a pair's labels are flipped (conservative "
                           "DPO), in [0, 0.5)",
        "simpo_gamma": "simpo target reward margin gamma",
        "orpo_alpha": "orpo weight of the odds ratio term (the paper's lambda, TRL's beta)",
        "sft_weight": "add this times the chosen response's per-token NLL to every pair's loss",
        "kto_desirable_weight": "kto: weight of the desirable examples' losses (TRL's "
                                "desirable_weight; KTO paper: keep w_d n_d / (w_u n_u) in "
                                "[1, 4/3])",
        "kto_undesirable_weight": "kto: weight of the undesirable examples' losses (TRL's "
                                  "undesirable_weight)"})
    g.add_argument("--ref_model_path", default=None, help="dpo/ipo/kto reference model (default: the "
                   "starting --model_path; under LoRA: the policy with adapters disabled)")
    g.add_argument("--precomputed_ref_logps", action="store_true", help="dpo/ipo: read the "
                   "reference log-probs from reference_logps.npz beside each dataset (python -m "
                   "trainer.reference_logps), so training holds one model")
    g = p.add_argument_group("saving and logging")
    g.add_argument("--save_steps", type=int, default=0, help="save every N optimizer steps (0: off)")
    g.add_argument("--save_epochs", type=int, default=0, help="save every N epochs (0: off)")
    g.add_argument("--save_optimizer", action="store_true", help="also save the DeepSpeed engine "
                   "checkpoint (optimizer, LR scheduler) for exact resume")
    g.add_argument("--save_total_limit", type=int, default=0, help="keep the newest N (0: all)")
    g.add_argument("--logging_steps", type=int, default=d.logging_steps, help="log every N steps")
    g.add_argument("--eval_steps", type=int, default=0, help="eval every N steps (0: only at the end)")
    g.add_argument("--eval_max_samples", type=int, default=d.eval_max_samples, help="evaluate only the "
                   "first N samples of --eval_data_path (0: all)")
    g.add_argument("--report_to", nargs="*", default=d.report_to, metavar="{" + ",".join(
                   ("none",) + REPORT_TO) + "}", help="trackers, any subset: tensorboard "
                   "(RUN/tensorboard), wandb (WANDB_PROJECT/WANDB_MODE apply), mlflow "
                   "(MLFLOW_TRACKING_URI, else sqlite RUN/mlflow.db); run name = --save_name")
    # The deepspeed launcher appends --local_rank=N; rank comes from the environment instead.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Flags, with `--config FILE` values under them (the command line wins)."""
    ns = parse_with_config(build_parser(), argv)
    values = vars(ns)
    values.pop("local_rank", None)
    values["add_tokens"] = _split_tokens(values["add_tokens"])
    values["report_to"] = [t for t in values["report_to"] if t != "none"]
    return TrainArgs(**values)


def _check_positive(args: TrainArgs, problems: list[str]) -> None:
    for name in ("micro_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in ("save_steps", "save_epochs", "save_total_limit", "eval_steps", "num_workers",
                 "eval_max_samples"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if args.weight_decay < 0:
        problems.append(f"--weight_decay must be >= 0 (got {args.weight_decay})")
    if args.max_grad_norm < 0:
        problems.append(f"--max_grad_norm must be >= 0 (got {args.max_grad_norm}; 0 disables)")
    for name in ("adam_beta1", "adam_beta2"):
        if getattr(args, name) is not None and not 0.0 <= getattr(args, name) < 1.0:
            problems.append(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    if args.adam_epsilon <= 0:
        problems.append(f"--adam_epsilon must be > 0 (got {args.adam_epsilon})")
    if not 0.0 <= args.warmup_ratio < 1.0:
        problems.append(f"--warmup_ratio must be in [0, 1) (got {args.warmup_ratio})")


def _check_length(args: TrainArgs, problems: list[str]) -> None:
    if args.max_epochs is None and args.max_steps is None:
        problems.append("give one of --max_epochs or --max_steps")
    if args.max_epochs is not None and args.max_epochs <= 0:
        problems.append(f"--max_epochs must be > 0 (got {args.max_epochs})")
    if args.max_steps is not None and args.max_steps < 1:
        problems.append(f"--max_steps must be >= 1 (got {args.max_steps})")


def _check_paths(args: TrainArgs, problems: list[str]) -> None:
    model = Path(args.model_path)
    if not (model / "config.json").is_file():
        problems.append(f"--model_path {model}: no config.json there (expected a Hugging Face model dir)")
    problems += data_path_problems(args)
    ds_path = deepspeed_config_file(args.deepspeed_config_path)
    for flag, p in (("--deepspeed_config_path", ds_path), ("--lora_config_path", args.lora_config_path)):
        if p is not None and not Path(p).is_file():
            hint = (f" (nor a bundled config: {', '.join(sorted(c.stem for c in BUNDLED_CONFIG_DIR.glob('*.json')))})"
                    if flag == "--deepspeed_config_path" else "")
            problems.append(f"{flag} {p}: file not found{hint}")
        elif p is not None:
            try:
                json.loads(Path(p).read_text())
            except ValueError as e:
                problems.append(f"{flag} {p}: not valid JSON ({e})")
    if args.tokenizer_path is not None and not (
            Path(args.tokenizer_path, "tokenizer.json").is_file()
            or Path(args.tokenizer_path, "tokenizer_config.json").is_file()):
        problems.append(f"--tokenizer_path {args.tokenizer_path}: no tokenizer.json or "
                        f"tokenizer_config.json there (expected a Hugging Face tokenizer dir)")
    if args.load_ckpt_path is not None and not Path(args.load_ckpt_path).exists():
        problems.append(f"--load_ckpt_path {args.load_ckpt_path}: not found")
    if args.output_path:
        problem = _unwritable(Path(args.output_path))
        if problem:
            problems.append(f"--output_path {args.output_path}: {problem}")


def data_path_problems(args: TrainArgs) -> list[str]:
    """--data_path / --eval_data_path: the mix syntax (shardfmt.mixing) and every path's kind
    (shardfmt dir, Megatron prefix, dir of Megatron pairs), from a few stat calls."""
    from shardfmt.errors import MixSpecError
    from shardfmt.mixing import parse_mix
    from shardfmt.sources import path_problem
    problems = []
    for flag, tokens in (("--data_path", args.data_path), ("--eval_data_path", args.eval_data_path)):
        if not tokens:
            continue
        try:
            entries = parse_mix(tokens, flag=flag)
        except MixSpecError as err:
            problems.append(str(err))
            continue
        problems += [f"{flag} {problem}" for e in entries if (problem := path_problem(e.path))]
    return problems


def _unwritable(path: Path) -> str | None:
    """Why run directories cannot be created under `path` (checked before any model loads)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link
            return f"{existing} is a dangling symlink"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"directory {existing} is not writable"
    return None


def _check_combinations(args: TrainArgs, problems: list[str]) -> None:
    if args.lora_config_path and not args.use_lora:
        problems.append("--lora_config_path given without --use_lora (add --use_lora)")
    if args.use_lora and args.from_scratch:
        problems.append("--use_lora with --from_scratch trains adapters on random weights; drop one")
    if args.eval_steps and not args.eval_data_path:
        problems.append("--eval_steps needs --eval_data_path")
    if args.save_total_limit and not (args.save_steps or args.save_epochs):
        problems.append("--save_total_limit without --save_steps/--save_epochs has nothing to prune")
    if args.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            problems.append("--attn_implementation flash_attention_2: flash_attn is not installed "
                            "(pip install '.[flash]' on a GPU machine, or use sdpa)")
    for tracker in args.report_to:
        if tracker not in REPORT_TO:
            problems.append(f"--report_to {tracker}: unknown tracker (choose from "
                            f"{', '.join(REPORT_TO)}, or none)")
        elif importlib.util.find_spec(tracker) is None:
            problems.append(f"--report_to {tracker}: the {tracker} package is not installed "
                            f"(pip install '.[track]')")
    if "/" in args.save_name or not args.save_name:
        problems.append(f"--save_name {args.save_name!r}: must be a non-empty name without '/'")
    ds_path = deepspeed_config_file(args.deepspeed_config_path)
    if ds_path and ds_path.is_file():
        problems.extend(_deepspeed_section_problems(args, ds_path))
    if ds_path and args.zero_stage is not None and ds_path.is_file():
        try:
            stage = json.loads(ds_path.read_text()).get(
                "zero_optimization", {}).get("stage", "auto")
        except ValueError:
            stage = "auto"
        if stage != "auto" and stage != args.zero_stage:
            problems.append(f"--zero_stage {args.zero_stage} contradicts zero_optimization.stage={stage} "
                            f"in {args.deepspeed_config_path}; drop the flag or set the stage to \"auto\"")


def _check_quantization_and_rope(args: TrainArgs, problems: list[str]) -> None:
    if args.quantization:
        if not args.use_lora:
            problems.append(f"--quantization {args.quantization}: quantised weights cannot be "
                            f"trained directly; add --use_lora (QLoRA)")
        if args.from_scratch:
            problems.append(f"--quantization {args.quantization} with --from_scratch: there are no "
                            f"pretrained weights to quantise; drop one")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"--quantization {args.quantization}: bitsandbytes is not installed "
                            f"(pip install '.[qlora]')")
        if args.zero_stage == 3:
            problems.append(f"--quantization {args.quantization} with --zero_stage 3: ZeRO-3 "
                            f"partitions every parameter, and bitsandbytes' packed "
                            f"{args.quantization} weights keep their quantisation state (scales) "
                            f"outside the parameter, so a partition cannot be dequantised; use "
                            f"--zero_stage 2 (the quantised base is replicated: a 7B model in "
                            f"4-bit is ~4 GB per GPU)")
    if args.optimizer.endswith("8bit") and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"--optimizer {args.optimizer}: bitsandbytes is not installed")
    if args.rope_scaling is None:
        for flag in ("rope_factor", "original_max_positions"):
            if getattr(args, flag) is not None:
                problems.append(f"--{flag} given without --rope_scaling (add --rope_scaling "
                                f"{'/'.join(ROPE_SCALINGS)})")
    else:
        if args.rope_factor is None:
            problems.append(f"--rope_scaling {args.rope_scaling} needs --rope_factor F (e.g. 4 "
                            f"for 4x the context)")
        elif args.rope_factor <= 1.0:
            problems.append(f"--rope_factor must be > 1 (got {args.rope_factor})")
        if args.original_max_positions is not None and args.original_max_positions < 1:
            problems.append(f"--original_max_positions must be >= 1 (got "
                            f"{args.original_max_positions})")
def _check_objective(args: TrainArgs, problems: list[str]) -> None:
    if args.objective == "sft":
        for name, default in (("ref_model_path", None), ("precomputed_ref_logps", False),
                              ("sft_weight", 0.0)):
            if getattr(args, name) != default:
                problems.append(f"--{name} is for preference objectives; add --objective "
                                f"dpo|ipo|orpo|simpo|kto or drop it")
    if args.objective != "kto":
        for name in ("kto_desirable_weight", "kto_undesirable_weight"):
            if getattr(args, name) != 1.0:
                problems.append(f"--{name} is for --objective kto; add it or drop the flag")
    # a flag the objective does not read is refused, not ignored (defaults: TrainArgs)
    readers = {"beta": ("dpo", "ipo", "simpo", "kto"), "simpo_gamma": ("simpo",),
               "orpo_alpha": ("orpo",)}
    for name, objectives in readers.items():
        if args.objective not in objectives and getattr(args, name) != getattr(TrainArgs, name):
            hint = " (ORPO's weight is --orpo_alpha, TRL's beta)" if (
                name == "beta" and args.objective == "orpo") else ""
            problems.append(f"--{name} is read by --objective {'/'.join(objectives)}, not "
                            f"{args.objective}{hint}; drop it or change --objective")
    if args.objective == "sft":
        return
    if args.beta <= 0:
        problems.append(f"--beta must be > 0 (got {args.beta})")
    if not 0.0 <= args.label_smoothing < 0.5:
        problems.append(f"--label_smoothing must be in [0, 0.5) (got {args.label_smoothing})")
    if args.label_smoothing and args.objective not in ("dpo", "simpo"):
        problems.append(f"--label_smoothing applies to dpo and simpo, not {args.objective}")
    if args.orpo_alpha < 0 or args.sft_weight < 0:
        problems.append("--orpo_alpha and --sft_weight must be >= 0")
    if args.objective == "kto":
        _check_kto(args, problems)
    elif args.objective not in ("dpo", "ipo") and (args.ref_model_path or
                                                   args.precomputed_ref_logps):
        problems.append(f"--objective {args.objective} uses no reference model; drop "
                        f"--ref_model_path/--precomputed_ref_logps")
    if args.ref_model_path and not (Path(args.ref_model_path) / "config.json").is_file():
        problems.append(f"--ref_model_path {args.ref_model_path}: no config.json there")


def _check_kto(args: TrainArgs, problems: list[str]) -> None:
    if args.kto_desirable_weight <= 0 or args.kto_undesirable_weight <= 0:
        problems.append("--kto_desirable_weight and --kto_undesirable_weight must be > 0")
    if args.sft_weight:
        problems.append("--sft_weight applies to pair objectives (an NLL term on chosen), not kto")
    if args.precomputed_ref_logps:
        problems.append("--precomputed_ref_logps is not supported with --objective kto: the KL "
                        "reference point uses mismatched (prompt, completion) sequences built "
                        "from each step's batch, so their reference log-probs cannot be computed "
                        "once per dataset; drop the flag (the reference model then runs beside "
                        "the policy; under --use_lora it is the policy with adapters disabled)")
    if args.micro_batch_size * args.gradient_accumulation_steps < 2:
        problems.append("--objective kto estimates its KL reference point from mismatched "
                        "(prompt, completion) pairs within each rank's step, which needs at least "
                        "2 examples: raise --micro_batch_size or --gradient_accumulation_steps "
                        "(TRL likewise needs per_device_train_batch_size > 1)")


def _deepspeed_section_problems(args: TrainArgs, path: Path) -> list[str]:
    """The config's optimizer/scheduler sections checked before anything loads (the run's step
    count is not known yet: the file's own total_num_steps stands in)."""
    from trainer.ds_config import plan_optimizer, plan_scheduler
    try:
        raw = json.loads(path.read_text())
    except ValueError:
        return []  # reported by _check_paths
    if not isinstance(raw, dict):
        return [f"--deepspeed_config_path {path}: expected a JSON object"]
    problems = _optimizer_value_problems(raw, path)
    if problems:  # plan_optimizer would fail converting them (a ValueError that is not ours)
        return problems
    total = ((raw.get("scheduler") or {}).get("params") or {}).get("total_num_steps")
    try:
        opt = plan_optimizer(raw, str(path), args, cpu_offload=False)
        plan_scheduler(raw, str(path), args, lr=opt.lr,
                       total_steps=total if isinstance(total, int) else args.max_steps or 1)
    except ConfigError as e:  # ours only: anything else is a bug and keeps its traceback
        problems.append(str(e))
    return problems


def _optimizer_value_problems(raw: dict, path: Path) -> list[str]:
    """optimizer.params values the plan turns into numbers: "auto", a number, or (betas) two."""
    section = raw.get("optimizer")
    params = section.get("params") if isinstance(section, dict) else None
    if section is None:
        return []
    if not isinstance(section, dict) or not isinstance(params, (dict, type(None))):
        return [f"--deepspeed_config_path {path}: \"optimizer\" must be an object with \"type\" "
                f"and \"params\" objects"]

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    problems = []
    for key, value in (params or {}).items():
        if value == "auto":
            continue
        if key in ("lr", "eps", "weight_decay") and not number(value):
            problems.append(f"--deepspeed_config_path {path}: optimizer.params.{key} is {value!r}; "
                            f"use a number or \"auto\" (filled from the flag)")
        if key == "betas" and not (isinstance(value, list) and len(value) == 2
                                   and all(map(number, value))):
            problems.append(f"--deepspeed_config_path {path}: optimizer.params.betas is {value!r}; "
                            f"use two numbers, e.g. [0.9, 0.999], or \"auto\"")
    return problems


def validate_args(args: TrainArgs) -> list[str]:
    """Every problem with `args`, each naming the flag and the fix. Empty list: all good."""
    problems: list[str] = []
    _check_positive(args, problems)
    _check_length(args, problems)
    _check_paths(args, problems)
    _check_combinations(args, problems)
    _check_quantization_and_rope(args, problems)
    _check_objective(args, problems)
    return problems


def parse_and_validate(argv: list[str] | None = None) -> TrainArgs:
    args = parse_args(argv)
    problems = validate_args(args)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        print(f"trainer: {len(problems)} problem(s) with the arguments:\n{lines}", file=sys.stderr)
        raise SystemExit(2)
    return args
