"""QLoRA: load the base model in 4-bit (NF4, double quantisation) or 8-bit (LLM.int8) with
bitsandbytes, prepared for k-bit training by peft, and LoRA trained on top.

Memory (weights only): 7B parameters are 14 GB in bf16, ~3.9 GB in NF4 with double quantisation
(4.127 bits/param: 4-bit codes + an 8-bit absmax per 64 weights + fp32 second-level scales per
256 blocks), ~7 GB in int8. The LoRA weights, their gradients and optimizer moments stay in fp32.

Data parallel: ZeRO-2 (and 1) partition only the trainable LoRA parameters' gradients and
optimizer state; the quantised base is replicated and frozen. ZeRO-3 is refused in
trainer/args.py (and for stage-3 DeepSpeed JSON files in train.py): it partitions every
parameter, and a partition of a packed 4-bit weight cannot be dequantised without the
quantisation state bitsandbytes keeps outside the parameter.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from trainer.errors import UsageError

log = logging.getLogger("trainer")

ZERO3_REFUSAL = ("ZeRO-3 partitions every parameter, and bitsandbytes' packed quantised weights keep "
                 "their quantisation state (scales) outside the parameter, so a partition cannot be "
                 "dequantised; use ZeRO-2 (set zero_optimization.stage to 2, or --zero_stage 2)")


def bnb_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for --quantization 4bit|8bit; matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UsageError(f"--quantization {kind!r}: expected 4bit or 8bit")


def load_kwargs(kind: str | None, compute_dtype: torch.dtype, device: torch.device) -> dict:
    """Extra from_pretrained keyword arguments: quantisation config and the one device to load on."""
    if not kind:
        return {}
    index = device.index if device.type == "cuda" and device.index is not None else device.type
    return {"quantization_config": bnb_config(kind, compute_dtype), "device_map": {"": index}}


def prepare_for_training(model, *, gradient_checkpointing: bool):
    """peft's k-bit preparation: freeze the base, norms/embeddings to fp32, input grads for
    checkpointing (non-reentrant, like the trainer's own); 4-bit layers kept on one kernel path."""
    from peft import prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_training_kernels(model)
    return model


def keep_training_kernels(model) -> int:
    """Turn off bitsandbytes' CPU inference repack of 4-bit weights; returns how many layers.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight the first time
    it runs in eval mode on an input that needs no gradient (an eval pass; or layer 0's q/k/v,
    whose input comes from the frozen embedding), into a layout for its bf16 inference kernel:
    the NF4 scales are rounded to bf16 and every later forward of that layer, train mode too,
    takes the bf16 kernel (~4e-3 in the logits). Saving a checkpoint calls state_dict(), which
    unpacks it and re-quantises the rounded scales (a new double-quantisation offset), so the
    run's base weights then differ from a fresh load's: a resumed run diverged by ~3e-5 in the
    adapter (bench/qlora_cpu_repack.py measures both). With the flag off, eval passes, training
    and saving all use the dequantise + fp32 matmul path training uses; eval costs a little more
    time on CPU (the bf16 kernel is faster), GPUs are unaffected (the repack is CPU-only).
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in layers:
        # read by Linear4bit.forward only, to decide the repack (set once in its __init__)
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model) -> bool:
    base = getattr(model, "module", model)
    return bool(getattr(base, "is_quantized", False) or getattr(base, "is_loaded_in_4bit", False)
                or getattr(base, "is_loaded_in_8bit", False))


@contextlib.contextmanager
def eval_mode_on_training_kernels(model) -> Iterator[None]:
    """`model` in eval mode (no dropout) for the block, except bitsandbytes' quantised layers,
    which stay in train mode: in eval mode LLM.int8 layers switch to the int8 inference matmul
    (and 4-bit ones to the repack, keep_training_kernels), so a forward would not have the
    numerics training has. The previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        for m in model.modules():
            if type(m).__module__.startswith("bitsandbytes."):
                m.training = True
        yield
    finally:
        model.train(was_training)
