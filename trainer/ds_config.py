"""The DeepSpeed config: a bundled ZeRO-2/ZeRO-3/ZeRO-3-offload JSON (or the user's) with "auto"
values filled, and its optimizer/scheduler sections mapped to what the trainer builds:

  optimizer.type  Adam/AdamW -> torch AdamW (Adam with adam_w_mode false: torch Adam, L2 decay);
                  Lion -> trainer.optim.Lion; with offload_optimizer to cpu/nvme: DeepSpeed's
                  DeepSpeedCPUAdam / DeepSpeedCPULion (ZeRO-Offload needs them).
                  "auto": lr <- --learning_rate, betas <- --adam_beta1/2, eps <- --adam_epsilon,
                  weight_decay <- --weight_decay. Other types: one line naming the supported ones.
  scheduler.type  WarmupLR / WarmupDecayLR / WarmupCosineLR -> DeepSpeed's own class, "auto":
                  warmup_min_lr 0, warmup_max_lr <- --learning_rate, warmup_num_steps <-
                  round(--warmup_ratio x steps) (at least 1), total_num_steps <- the run's steps
                  (as transformers' HfTrainerDeepSpeedConfig fills them). An absent key keeps
                  DeepSpeed's default unless its flag was set; total_num_steps is always filled.
The trainer builds both and passes them to deepspeed.initialize (the sections are removed from the
config DeepSpeed sees), so weight-decay groups, resume and the loss equalities are the same for
every config. Without the sections: --optimizer and --lr_scheduler.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.args import BUNDLED_CONFIG_DIR, TrainArgs, deepspeed_config_file
from trainer.errors import ConfigError


def bundled_config_path(zero_stage: int | None) -> Path:
    return BUNDLED_CONFIG_DIR / f"zero{zero_stage or 2}.json"


def read_config(args: TrainArgs) -> tuple[dict, str]:
    """(raw config, its path): --deepspeed_config_path, else the bundled one for --zero_stage."""
    path = deepspeed_config_file(args.deepspeed_config_path) or bundled_config_path(args.zero_stage)
    return json.loads(path.read_text()), str(path)


def auto_values(args: TrainArgs, *, world_size: int, precision: str, hidden_size: int) -> dict[str, Any]:
    """Value of every "auto" key we know, by dotted path."""
    return {
        "train_batch_size": args.micro_batch_size * args.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "zero_optimization.stage": args.zero_stage or 2,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }


def _fill(node: Any, values: dict[str, Any], prefix: str, unknown: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{prefix}{k}.", unknown) for k, v in node.items()}
    if node == "auto":
        key = prefix[:-1]
        if key not in values:
            unknown.append(key)
            return node
        return values[key]
    return node


def resolve_config(raw: dict, path: str, values: dict[str, Any]) -> dict:
    """Fill "auto" values and reject values that contradict the flags. The optimizer/scheduler
    sections are taken out (see plan_optimizer/plan_scheduler: the trainer builds both and hands
    them to DeepSpeed, so the data-parallel and accumulation loss equalities hold for every config)."""
    problems: list[str] = []
    unknown: list[str] = []
    body = {k: v for k, v in raw.items() if k not in ("optimizer", "scheduler")}
    config = _fill(copy.deepcopy(body), values, "", unknown)
    problems += [f'"{k}": "auto" has no value the trainer can fill; set a number' for k in unknown]
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in raw and raw[key] != "auto" and raw[key] != values[key]:
            problems.append(f'"{key}": {raw[key]} contradicts the flags ({values[key]}); set it to "auto"')
    if problems:
        raise ConfigError(f"--deepspeed_config_path {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    config.setdefault("train_batch_size", values["train_batch_size"])
    config.setdefault("train_micro_batch_size_per_gpu", values["train_micro_batch_size_per_gpu"])
    config.setdefault("gradient_accumulation_steps", values["gradient_accumulation_steps"])
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def optimizer_offloaded(config: dict) -> bool:
    """ZeRO-Offload of the optimizer (to CPU or NVMe): DeepSpeed requires its CPU Adam/Lion."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


# ---------------------------------------------------------------------- optimizer / scheduler
# DeepSpeed config sections -> what the trainer builds. "auto" takes the flag's value; a number
# in the file is used as written, and is an error only if the flag was also changed from its
# default to a different value (the two would silently disagree otherwise).
DS_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "lion": "Lion"}  # lower-case, as DeepSpeed matches
DS_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
_ADAM_PARAMS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction",
                "amsgrad")
_LION_PARAMS = ("lr", "betas", "weight_decay")
_SCHEDULER_PARAMS = {  # name -> (accepted params, the params "auto" fills)
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                 "last_batch_iteration"),
    "WarmupDecayLR": ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps",
                      "warmup_type", "last_batch_iteration"),
    "WarmupCosineLR": ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio",
                       "warmup_type", "last_batch_iteration"),
}
DEFAULT_BETAS = {"adamw": (0.9, 0.95), "adam": (0.9, 0.95), "lion": (0.9, 0.99),
                 "adamw8bit": (0.9, 0.95), "paged_adamw8bit": (0.9, 0.95), "lion8bit": (0.9, 0.99)}


@dataclass
class OptimizerPlan:
    """What to build: `name` adamw (decoupled decay), adam (L2 decay, DeepSpeed's adam_w_mode
    false) or lion; on the CPU (DeepSpeed's CPU Adam/Lion) when the optimizer is offloaded."""
    name: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    cpu_offload: bool
    source: str

    def describe(self) -> str:
        impl = {("adamw", False): "torch AdamW", ("adam", False): "torch Adam (L2 weight decay)",
                ("lion", False): "Lion", ("adamw", True): "DeepSpeedCPUAdam (adamw_mode)",
                ("adam", True): "DeepSpeedCPUAdam (L2 weight decay)",
                ("lion", True): "DeepSpeedCPULion"}.get((self.name, self.cpu_offload),
                                                        f"bitsandbytes {self.name}")
        eps = "" if "lion" in self.name else f" eps {self.eps:g}"
        return (f"optimizer {impl} from {self.source}: lr {self.lr:g} betas {self.betas[0]:g}/"
                f"{self.betas[1]:g}{eps} weight_decay {self.weight_decay:g}")


@dataclass
class SchedulerPlan:
    """`kind` is ours (constant/linear/cosine from --lr_scheduler) or a DeepSpeed schedule class."""
    kind: str
    params: dict
    source: str

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.params.items())
        return f"LR schedule {self.kind} from {self.source}: {shown}"


def _changed(args: TrainArgs, name: str) -> bool:
    return getattr(args, name) != getattr(TrainArgs(), name)


def _take(section: str, key: str, value: Any, *, flag: str, flag_value: Any, changed: bool,
          problems: list[str]) -> Any:
    """The value to use for `section.params.key`: the flag's for "auto", else the file's (an
    error if the flag was changed to something else)."""
    if value == "auto":
        return flag_value
    if changed and value != flag_value and not (isinstance(value, list) and tuple(value) == flag_value):
        problems.append(f'{section}.params.{key}: {value} contradicts {flag} {flag_value}; set it to '
                        f'"auto" or drop the flag')
    return tuple(value) if isinstance(value, list) else value


def plan_optimizer(raw: dict, path: str, args: TrainArgs, *, cpu_offload: bool) -> OptimizerPlan:
    """The optimizer from the config's `optimizer` section ("auto" filled from the flags), else
    from --optimizer. Raises ConfigError naming the key and the fix."""
    section = raw.get("optimizer")
    if section is None:
        name = args.optimizer
        if cpu_offload and name not in ("adamw", "lion"):
            raise ConfigError(f"--optimizer {name} with offload_optimizer in {path}: ZeRO-Offload runs "
                             f"DeepSpeed's CPU Adam/Lion; use --optimizer adamw or lion, or no offload")
        return OptimizerPlan(name=name, lr=args.learning_rate, betas=_flag_betas(args, name),
                             eps=args.adam_epsilon, weight_decay=args.weight_decay,
                             cpu_offload=cpu_offload, source="--optimizer")
    problems: list[str] = []
    ds_type = str(section.get("type", ""))
    kind = ds_type.lower()
    if kind not in DS_OPTIMIZERS:
        raise ConfigError(f'--deepspeed_config_path {path}: optimizer.type "{ds_type}" is not supported '
                         f'here; use one of {", ".join(DS_OPTIMIZERS.values())}, or remove the '
                         f'"optimizer" section and choose with --optimizer {{{",".join(("adamw", "lion"))}}}')
    params = dict(section.get("params") or {})
    allowed = _LION_PARAMS if kind == "lion" else _ADAM_PARAMS
    for key in params:
        if key not in allowed:
            problems.append(f"optimizer.params.{key}: not supported for {ds_type} (supported: "
                            f"{', '.join(allowed)})")
    base = "lion" if kind == "lion" else "adamw"
    if _changed(args, "optimizer") and args.optimizer != base:
        problems.append(f'optimizer.type "{ds_type}" contradicts --optimizer {args.optimizer}; drop one')
    if kind != "lion":
        if params.get("bias_correction", True) is not True or params.get("amsgrad", False) is not False:
            problems.append("optimizer.params: bias_correction false / amsgrad true are not supported")
        if params.get("adam_w_mode", True) is False and kind == "adam":
            kind = "adam"  # Adam with L2 weight decay, as DeepSpeed does for adam_w_mode false
        else:
            kind = "adamw"  # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
    where = "optimizer"
    lr = _take(where, "lr", params.get("lr", "auto"), flag="--learning_rate",
               flag_value=args.learning_rate, changed=_changed(args, "learning_rate"), problems=problems)
    betas = _take(where, "betas", params.get("betas", "auto"), flag="--adam_beta1/--adam_beta2",
                  flag_value=_flag_betas(args, base),
                  changed=_changed(args, "adam_beta1") or _changed(args, "adam_beta2"), problems=problems)
    eps = _take(where, "eps", params.get("eps", "auto"), flag="--adam_epsilon",
                flag_value=args.adam_epsilon, changed=_changed(args, "adam_epsilon"), problems=problems)
    wd = _take(where, "weight_decay", params.get("weight_decay", "auto"), flag="--weight_decay",
               flag_value=args.weight_decay, changed=_changed(args, "weight_decay"), problems=problems)
    if problems:
        raise ConfigError(f"--deepspeed_config_path {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return OptimizerPlan(name=kind, lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                         eps=float(eps), weight_decay=float(wd), cpu_offload=cpu_offload,
                         source=f"{Path(path).name} ({ds_type})")


def _flag_betas(args: TrainArgs, name: str) -> tuple[float, float]:
    b1, b2 = DEFAULT_BETAS[name]
    return (b1 if args.adam_beta1 is None else args.adam_beta1,
            b2 if args.adam_beta2 is None else args.adam_beta2)


def warmup_steps_for(args: TrainArgs, total_steps: int) -> int:
    return int(round(args.warmup_ratio * total_steps))


def plan_scheduler(raw: dict, path: str, args: TrainArgs, *, total_steps: int,
                   lr: float) -> SchedulerPlan:
    """The LR schedule from the config's `scheduler` section (DeepSpeed's own class, "auto"
    filled as the Hugging Face Trainer fills it), else --lr_scheduler/--warmup_ratio."""
    section = raw.get("scheduler")
    warmup = warmup_steps_for(args, total_steps)
    if section is None:
        return SchedulerPlan(kind=args.lr_scheduler, params={"warmup_ratio": args.warmup_ratio,
                             "warmup_steps": warmup, "total_steps": total_steps}, source="--lr_scheduler")
    kind = str(section.get("type", ""))
    if kind not in DS_SCHEDULERS:
        raise ConfigError(f'--deepspeed_config_path {path}: scheduler.type "{kind}" is not supported '
                         f'here; use one of {", ".join(DS_SCHEDULERS)}, or remove the "scheduler" '
                         f'section and choose with --lr_scheduler {{{",".join(("constant", "linear", "cosine"))}}}')
    problems: list[str] = []
    params = dict(section.get("params") or {})
    for key in params:
        if key not in _SCHEDULER_PARAMS[kind]:
            problems.append(f"scheduler.params.{key}: not a parameter of {kind} (its parameters: "
                            f"{', '.join(_SCHEDULER_PARAMS[kind])})")
    if _changed(args, "lr_scheduler"):
        problems.append(f'scheduler.type "{kind}" contradicts --lr_scheduler {args.lr_scheduler}; drop one')
    if params.get("last_batch_iteration", -1) != -1:
        problems.append("scheduler.params.last_batch_iteration: must be -1 (resume restores the "
                        "schedule position)")
    params.pop("last_batch_iteration", None)
    # DeepSpeed refuses warmup_num_steps 0 (and uses at least 2 anyway)
    fills = {"warmup_min_lr": (0.0, None, False), "warmup_min_ratio": (0.0, None, False),
             "warmup_max_lr": (lr, "--learning_rate", _changed(args, "learning_rate")),
             "warmup_num_steps": (max(1, warmup), "--warmup_ratio", _changed(args, "warmup_ratio")),
             "total_num_steps": (total_steps, "--max_steps/--max_epochs", True)}
    out = {}
    for key in _SCHEDULER_PARAMS[kind]:
        if key == "last_batch_iteration":
            continue
        if key not in params:  # absent: DeepSpeed's default, unless the flag was set (or required)
            if key == "total_num_steps" or (key in fills and fills[key][1] and fills[key][2]):
                out[key] = fills[key][0]
            continue
        if key in fills:
            value, flag, changed = fills[key]
            out[key] = _take("scheduler", key, params.get(key, "auto"), flag=flag or "(no flag)",
                             flag_value=value, changed=changed and flag is not None, problems=problems)
        else:
            out[key] = params[key]
    if problems:
        raise ConfigError(f"--deepspeed_config_path {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return SchedulerPlan(kind=kind, params=out, source=Path(path).name)


def build_optimizer_and_scheduler(model, opt: OptimizerPlan, sched: SchedulerPlan):
    """(optimizer, LR scheduler) for deepspeed.initialize, as planned."""
    import torch

    from trainer.optim import build_optimizer, build_scheduler, param_groups
    if opt.cpu_offload:
        groups = param_groups(model, opt.weight_decay)
        if opt.name == "lion":
            from deepspeed.ops.lion import DeepSpeedCPULion
            optimizer = DeepSpeedCPULion(groups, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                         weight_decay=opt.weight_decay, adamw_mode=opt.name == "adamw")
    elif opt.name == "adam":
        optimizer = torch.optim.Adam(param_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas,
                                     eps=opt.eps, foreach=False)
    else:
        optimizer = build_optimizer(model, opt.name, opt.lr, opt.weight_decay, betas=opt.betas,
                                    eps=opt.eps)
    if sched.kind in DS_SCHEDULERS:
        from deepspeed.runtime import lr_schedules
        scheduler = getattr(lr_schedules, sched.kind)(optimizer, **sched.params)
    else:
        scheduler = build_scheduler(optimizer, kind=sched.kind, warmup_ratio=sched.params["warmup_ratio"],
                                    total_steps=sched.params["total_steps"])
    return optimizer, scheduler


def set_schedule_position(scheduler, step: int) -> None:
    """Put `scheduler` where it is after `step` optimizer steps (resume without engine state)."""
    if hasattr(scheduler, "last_batch_iteration"):  # DeepSpeed's schedules: step() after each step
        scheduler.step(last_batch_iteration=step - 1)
    else:  # torch LambdaLR
        scheduler.last_epoch = step - 1
        scheduler.step()


def zero_stage_of(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
