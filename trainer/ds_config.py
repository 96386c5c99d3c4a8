"""The DeepSpeed config: a bundled ZeRO-2/ZeRO-3 JSON (or the user's) with "auto" values filled."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from trainer.args import BUNDLED_CONFIG_DIR, TrainArgs


def bundled_config_path(zero_stage: int | None) -> Path:
    return BUNDLED_CONFIG_DIR / f"zero{zero_stage or 2}.json"


def read_config(args: TrainArgs) -> tuple[dict, str]:
    """(raw config, its path): --deepspeed_config_path, else the bundled one for --zero_stage."""
    path = Path(args.deepspeed_config_path) if args.deepspeed_config_path else bundled_config_path(
        args.zero_stage)
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
    """Fill "auto" values; reject sections the trainer owns and values that contradict the flags."""
    problems: list[str] = []
    for section in ("optimizer", "scheduler"):
        if section in raw:
            problems.append(f'"{section}" section: the trainer builds the {section} from --optimizer/'
                            f'--learning_rate/--lr_scheduler/--warmup_ratio; remove the section')
    unknown: list[str] = []
    config = _fill(copy.deepcopy(raw), values, "", unknown)
    problems += [f'"{k}": "auto" has no value the trainer can fill; set a number' for k in unknown]
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in raw and raw[key] != "auto" and raw[key] != values[key]:
            problems.append(f'"{key}": {raw[key]} contradicts the flags ({values[key]}); set it to "auto"')
    if problems:
        raise ValueError(f"--deepspeed_config_path {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    config.setdefault("train_batch_size", values["train_batch_size"])
    config.setdefault("train_micro_batch_size_per_gpu", values["train_micro_batch_size_per_gpu"])
    config.setdefault("gradient_accumulation_steps", values["gradient_accumulation_steps"])
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def zero_stage_of(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
