"""Next-token loss: summed cross-entropy over the tokens that carry a label.

Two ways to compute the same number:

* `token_loss_sum(logits, labels)` — from the model's B x L x V logits (any model).
* the fused head (`--fused_loss`, default) — the output layer and the cross-entropy in one pass,
  chunk by chunk, on the positions whose next token is a label only. A 2048-token packed row at a
  32k vocab materialises 262 MB of logits, then log-softmax, its backward and a 262 MB zero-fill on
  the logits path; the fused head keeps one 32 MB chunk at a time and computes the gradients of the
  hidden states and the output weight while the chunk is in cache. Measured on this repo's CPU
  bench (tiny Llama, packed 2048): one forward+backward 3.0 s -> 2.0 s
  (`bench/train_throughput.py`). Positions without a label (prompts, padding) cost nothing in
  the output layer, so unpacked batches also stop paying for their padding there.

Example (tiny numbers)::

    >>> h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)
    >>> t = torch.tensor([1, 0, 10, 3, 3])
    >>> ref = F.cross_entropy(h @ w.t(), t, reduction="sum")
    >>> torch.allclose(linear_cross_entropy_sum(h, w, t, chunk_rows=2), ref)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data import IGNORE_INDEX
from trainer.families import FUSED_MODEL_TYPES, LOGIT_TRANSFORM_ATTRS

# Logits per chunk: 2**23 fp32 = 32 MB (262 rows at a 32k vocab, 55 at Qwen's 152k). Smaller chunks
# lose matmul efficiency; 4x larger ones measured 15% slower on CPU (the chunk leaves the cache).
CHUNK_ELEMENTS = 1 << 23


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Label of the next position for every position: `labels` shifted left, -100 at the end."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labels != -100 (fp32), from full logits.

    The labels are shifted, not the logits: slicing `logits[:, :-1]` copies the whole B x L x V
    tensor (300 MB at 4 x 2048 x 32k fp32) and its backward zero-fills another; measured -24% step
    time on CPU (bench/train_throughput.py) with this form.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           next_token_labels(labels).reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); gradients are computed in the forward, per chunk.

    Like Liger-Kernel's fused linear cross-entropy: the backward only scales the stored gradients,
    so the weight gradient (one weight-sized buffer, in the weight's dtype) lives from forward to
    backward. Softmax and log-sum-exp run in fp32 whatever the input dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, row_losses=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            z = (h @ weight.t()).float()                      # rows x V logits
            lse = torch.logsumexp(z, dim=-1)
            rows = lse - z.gather(1, t[:, None]).squeeze(1)
            total += rows.sum()
            if row_losses is not None:  # per-row losses on the side (per-source logging)
                row_losses[start:start + chunk_rows] = rows
            if need_h or need_w:
                z.sub_(lse[:, None]).exp_()                    # softmax, in place
                z[torch.arange(t.shape[0], device=z.device), t] -= 1.0  # d loss / d logits
                g = z.to(hidden.dtype)
                if need_h:
                    grad_h[start:start + chunk_rows] = g @ weight
                if need_w:
                    grad_w.addmm_(g.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out.to(torch.float32)
        if grad_h is not None:
            grad_h = grad_h.mul_(scale.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(scale.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             chunk_rows: int | None = None,
                             row_losses: torch.Tensor | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, reduction="sum")` without the N x V logits.

    hidden: N x H, weight: V x H (a bias-free output layer), targets: N class ids (no -100: select
    the labelled rows first). chunk_rows defaults to CHUNK_ELEMENTS // V. Backward once only.
    row_losses (optional, N fp32): filled with each row's loss, outside autograd.
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk_rows, row_losses)


def _add_group_sums(group_sums: torch.Tensor, losses: torch.Tensor, groups: torch.Tensor) -> None:
    """group_sums[g] += sum of `losses` whose group is g (groups < 0 are skipped)."""
    keep = groups.to(losses.device) >= 0
    group_sums.index_add_(0, groups.to(losses.device)[keep].to(group_sums.device),
                          losses.detach()[keep].to(device=group_sums.device,
                                                    dtype=group_sums.dtype))


def fused_head_problem(model: torch.nn.Module, *, zero3: bool = False) -> str | None:
    """Why the fused head cannot stand in for this model's output layer, or None if it can."""
    if zero3:
        # The head's weight gets its gradient from the fused function's forward, outside the
        # layer's backward, where ZeRO-3 has already re-partitioned it (size-0 parameter).
        return "ZeRO-3 partitions the output layer's weight outside the layer's own forward/backward"
    base = getattr(model, "module", model)  # a DeepSpeed engine holds the model in .module
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return (f"model_type {model_type!r} is not one whose logits are exactly lm_head(hidden) "
                f"({', '.join(sorted(FUSED_MODEL_TYPES))})")
    for attr in LOGIT_TRANSFORM_ATTRS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"{attr}={getattr(config, attr)} transforms the logits after the output layer"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return (f"the output layer is {type(head).__name__}, not a bias-free torch.nn.Linear "
                "(e.g. LoRA or modules_to_save on lm_head)")
    return None


def forward_loss_sum(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, *,
                     fused: bool, token_groups: torch.Tensor | None = None,
                     group_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Run `model(**inputs)` and return the summed next-token loss over labels != -100.

    fused=True (only where `fused_head_problem(model)` is None): a forward pre-hook on the output
    layer takes its input hidden states, computes the loss from them and the layer's weight (inside
    the layer's call, so ZeRO-3 has gathered the weight), and hands the layer zero positions, so
    the model returns empty logits.

    token_groups (same shape as labels, -1 = none) with group_sums (G,): the loss is also summed
    per group of the predicted token (per data source), into group_sums, without gradients. The
    returned loss is computed exactly as without them. Cost: nothing with the fused head; one
    extra no-grad cross-entropy over the logits otherwise.
    """
    next_groups = None
    if token_groups is not None and group_sums is not None:
        next_groups = F.pad(token_groups, (0, 1), value=-1)[:, 1:].to(labels.device)
    if not fused:
        logits = model(**inputs).logits
        loss = token_loss_sum(logits, labels)
        if next_groups is not None:
            with torch.no_grad():
                per = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                      next_token_labels(labels).reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="none")
            _add_group_sums(group_sums, per, next_groups.reshape(-1))
        return loss
    base = getattr(model, "module", model)
    head = base.get_output_embeddings()
    next_labels = next_token_labels(labels)
    keep = next_labels != IGNORE_INDEX
    captured: list[torch.Tensor] = []

    def loss_from_hidden(module, args):
        hidden = args[0]
        rows = None
        if next_groups is not None:
            rows = torch.zeros(int(keep.sum()), dtype=torch.float32, device=hidden.device)
        captured.append(linear_cross_entropy_sum(hidden[keep], module.weight, next_labels[keep],
                                                 row_losses=rows))
        if rows is not None:
            _add_group_sums(group_sums, rows, next_groups[keep])
        return (hidden[:, :0],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(loss_from_hidden)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the output layer ran {len(captured)} times in one forward (expected 1); "
                           "train with --no-fused_loss")
    return captured[0]
