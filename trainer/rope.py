"""--rope_scaling linear|dynamic|yarn|llama3 --rope_factor F [--original_max_positions N].

Written into `config.rope_parameters` (transformers 5's home for RoPE settings) of the model
being trained, so every checkpoint's config.json and every export carries it, and LoRA exports
re-apply it to the base config (trainer/export.py reads it from the run's arguments).

  linear   positions divided by F (position interpolation); max_position_embeddings = N x F
  dynamic  NTK-aware base stretched only once a sequence exceeds N (transformers compares with
           max_position_embeddings, which stays N); usable context N x F
  yarn     NTK-by-parts + attention temperature; original_max_position_embeddings = N,
           max_position_embeddings = N x F
  llama3   Llama 3.1's frequency-band scaling (low_freq_factor 1, high_freq_factor 4);
           original_max_position_embeddings = N, max_position_embeddings = N x F

N = --original_max_positions, default the model's max_position_embeddings. The data-vs-model
check uses N x F (`position_limit`).
"""

from __future__ import annotations

import copy

from trainer.errors import RopeScalingError

LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _rope_dicts(config) -> list[dict]:
    """The rope parameter dicts to scale: the one dict, or per layer type the full-attention one
    (Gemma3 keeps local sliding layers at their own short-range RoPE)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return []
    if "rope_type" in params or "rope_theta" in params:
        return [params]
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    if "full_attention" in nested:
        return [nested["full_attention"]]
    return list(nested.values())


def no_rope_reason(config) -> str | None:
    """Why the model has no RoPE to scale, or None."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "alibi", False):
        return f"model_type {model_type!r} uses ALiBi position biases (alibi=True), not RoPE"
    if not _rope_dicts(config):
        return (f"model_type {model_type!r} has no rotary position embeddings (its positions are "
                f"a learned table or a bias)")
    return None


def apply_rope_scaling(config, *, kind: str, factor: float, original_max_positions: int | None):
    """A copy of `config` with RoPE scaled; raises RopeScalingError for models without RoPE."""
    reason = no_rope_reason(config)
    if reason:
        raise RopeScalingError(f"--rope_scaling {kind}: {reason}. RoPE scaling applies only to "
                               f"RoPE models (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-NeoX, ...); "
                               f"drop --rope_scaling, or re-encode the data with a --max_length "
                               f"within the model's {getattr(config, 'max_position_embeddings', '?')}"
                               f" positions")
    config = copy.deepcopy(config)
    original = int(original_max_positions or config.max_position_embeddings)
    for params in _rope_dicts(config):
        params["rope_type"] = kind
        params["factor"] = float(factor)
        if kind in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = original
        if kind == "llama3":
            for key, value in LLAMA3_DEFAULTS.items():
                params.setdefault(key, value)
    config.max_position_embeddings = original if kind == "dynamic" else int(original * factor)
    return config


def position_limit(config) -> int | None:
    """Longest sample the model can position: max_position_embeddings, x factor for dynamic NTK."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    dicts = _rope_dicts(config)
    if dicts and dicts[0].get("rope_type") == "dynamic" and dicts[0].get("factor"):
        return int(limit * dicts[0]["factor"])
    return int(limit)


def rope_summary(config) -> dict | None:
    dicts = _rope_dicts(config)
    return dict(dicts[0]) if dicts else None
