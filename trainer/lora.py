"""Which modules LoRA adapts: derived from the model by default, checked when the user lists them.

Default (no `target_modules` in --lora_config_path, or "all-linear"): peft's all-linear rule,
resolved here so the names are logged, saved in resolved_config.json and checked. Every
`nn.Linear` / GPT-2 `Conv1D` (and bitsandbytes' 4/8-bit Linear, which subclass nn.Linear) except
the output layer, named by their last component: Llama's q/k/v/o/gate/up/down_proj, Phi-3's fused
`qkv_proj`/`gate_up_proj`, GPT-NeoX/Falcon's `query_key_value`, GPT-2's `c_attn`/`c_fc`/`c_proj`.

MoE experts: transformers 5 stores a layer's experts as 3-D parameters (`experts.gate_up_proj`,
`experts.down_proj`, E x out x in), not as Linear modules, so all-linear cannot see them. peft
(>= 0.17) adapts such parameters with `target_parameters` (a LoRA per parameter, the same update
for every expert's slice); they are added by default. peft's parameter wrapper has no dropout, so
the default lora_dropout (0.05) becomes 0 for such models; a lora_dropout set in the user's JSON
is kept and the experts are then left out (warned). Not under ZeRO-3: the wrapper reads the full
parameter, which ZeRO-3 has partitioned away (size 0) outside the layer's forward.

A user list (peft's matching: a name equals a module's full name or its last components; a single
string is a regex on the full name) that matches no module is an error listing the Linear names
that exist; one that adapts only part of a block (e.g. q_proj, v_proj of self_attn) is warned
about, naming the projections left out.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch

from trainer.errors import LoraTargetError

log = logging.getLogger("trainer")

ALL_LINEAR = "all-linear"
DEFAULT_DROPOUT = 0.05


def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D
    return (torch.nn.Linear, Conv1D)


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Full name -> module of every Linear/Conv1D LoRA may adapt (the output layer excluded)."""
    base = getattr(model, "module", model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    classes = _linear_classes()
    return {name: m for name, m in base.named_modules()
            if isinstance(m, classes) and m is not head}


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """`<module>.<param>` suffixes of MoE expert weights stored as 3-D parameters (E x out x in)."""
    found: set[str] = set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and "expert" in name.rsplit(".", 1)[-1].lower():
                found.add(f"{name.rsplit('.', 1)[-1]}.{pname}")
    return sorted(found)


def _matches(full_name: str, targets) -> bool:
    """peft's rule (check_target_module_exists): a string is a regex on the full name; a list entry
    matches the full name or its trailing components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, full_name) is not None
    return any(full_name == t or full_name.endswith("." + t) for t in targets)


def _short_names(names) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def resolve_lora_targets(model: torch.nn.Module, settings: dict, *, zero3: bool = False) -> dict:
    """A copy of `settings` whose target_modules (and target_parameters) are explicit lists.

    Raises LoraTargetError when a user list matches no module; warns about partly adapted blocks.
    """
    cfg = dict(settings)
    linears = linear_modules(model)
    targets = cfg.get("target_modules")
    derived = targets is None or (isinstance(targets, str) and targets.lower() == ALL_LINEAR)
    dropout = cfg.get("lora_dropout")
    if derived:
        cfg["target_modules"] = _short_names(linears)
        if "target_parameters" not in cfg:
            experts = expert_parameters(model)
            if experts and zero3:
                log.warning("LoRA: MoE expert weights %s are not adapted under ZeRO-3 (peft's "
                            "parameter wrapper needs the whole parameter); use --zero_stage 2 to "
                            "adapt them", ", ".join(experts))
            elif experts and dropout not in (None, 0, 0.0):
                log.warning("LoRA: MoE expert weights %s are not adapted: peft's parameter wrapper "
                            "needs lora_dropout 0 (yours: %s); set it to 0 to adapt them",
                            ", ".join(experts), dropout)
            elif experts:
                cfg["target_parameters"] = experts
                dropout = 0.0 if dropout is None else dropout
    cfg["lora_dropout"] = DEFAULT_DROPOUT if dropout is None else dropout
    if derived:
        log.info("LoRA targets (all Linear layers but the output layer, derived from the model): "
                 "%s%s", ", ".join(cfg["target_modules"]),
                 f"; MoE experts: {', '.join(cfg['target_parameters'])}"
                 if cfg.get("target_parameters") else "")
        return cfg
    if isinstance(targets, str):
        hit = [n for n in linears if _matches(n, targets)]
        missing = [] if hit else [targets]
    else:
        targets = list(targets)
        hit = [n for n in linears if _matches(n, targets)]
        missing = [t for t in targets if not any(_matches(n, [t]) for n in linears)]
    if missing:
        raise LoraTargetError(
            f"--lora_config_path target_modules {missing} match no Linear layer of this "
            f"{getattr(getattr(model, 'config', None), 'model_type', '?')} model. Its Linear layers "
            f"are: {', '.join(_short_names(linears))}. Fix the list, or leave target_modules out "
            f"(or set \"all-linear\") to adapt all of them.")
    _warn_partial_blocks(linears, set(hit))
    return cfg


def _warn_partial_blocks(linears: dict[str, torch.nn.Module], hit: set[str]) -> None:
    """One warning per kind of block (self_attn, mlp, ...) where some projections are left out."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for name in linears:
        by_parent[name.rsplit(".", 1)[0]].append(name)
    left_out: dict[str, set[str]] = {}
    for parent, children in by_parent.items():
        chosen = [c for c in children if c in hit]
        if chosen and len(chosen) < len(children):
            kind = re.sub(r"\.\d+\.", ".*.", parent)
            left_out.setdefault(kind, set()).update(
                c.rsplit(".", 1)[-1] for c in children if c not in hit)
    for kind, names in sorted(left_out.items()):
        log.warning("LoRA target_modules adapt only part of %s: %s not adapted (add them to "
                    "target_modules, or leave target_modules out to adapt every Linear layer)",
                    kind, ", ".join(sorted(names)))


def wrapped_modules(peft_model: torch.nn.Module) -> list[str]:
    """Short names of the modules (and expert parameters) that got a LoRA adapter."""
    names = set()
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            short = name.replace(".base_layer", "").rsplit(".", 1)[-1]
            param = getattr(module, "parameter_name", None)  # peft's ParamWrapper (MoE experts)
            names.add(f"{short}.{param}" if param else short)
    return sorted(names)
