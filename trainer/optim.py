"""Optimizers (AdamW, Lion; bitsandbytes' 8-bit AdamW, paged AdamW and Lion) with weight-decay
groups, and the warmup + decay LR schedule.

The 8-bit optimizers keep both moments blockwise-quantised to 8 bits (2 bytes per parameter
instead of 8 for AdamW; tensors under 4096 elements stay 32-bit), the recipe of QLoRA and of
LLaMA-Factory/axolotl's `adamw_8bit`/`paged_adamw_8bit`/`lion_8bit`. "paged" moves the state to
CUDA unified memory that pages to the CPU under memory pressure (on CPU it is the plain one).
"""

from __future__ import annotations

import functools
import math

import torch

from trainer.errors import ConfigError


BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit",
                  "lion8bit": "Lion8bit"}


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an
    interpolated momentum; decoupled weight decay. Plain torch, runs on CPU and GPU."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; no decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned params keep their shape here
        (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, *,
                    betas: tuple[float, float] | None = None,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """betas None: (0.9, 0.95) for AdamW, (0.9, 0.99) for Lion."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas or (0.9, 0.95), eps=eps, foreach=False)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas or (0.9, 0.99))
    if name in BNB_OPTIMIZERS:
        import bitsandbytes as bnb
        cls = getattr(bnb.optim, BNB_OPTIMIZERS[name])
        betas = betas or ((0.9, 0.99) if name == "lion8bit" else (0.9, 0.95))
        extra = {} if name == "lion8bit" else {"eps": eps}
        return cls(groups, lr=lr, betas=betas, **extra)
    raise ConfigError(f"--optimizer {name!r}: expected adamw, lion or {', '.join(BNB_OPTIMIZERS)}")


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR after `step` optimizer steps: linear warmup, then constant,
    linear decay to 0 or cosine decay to 0 at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup_ratio: float,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Deterministic in the step count, so it can be rebuilt at any step (resume)."""
    warmup = int(round(warmup_ratio * total_steps))
    fn = functools.partial(lr_factor, kind=kind, warmup_steps=warmup, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
