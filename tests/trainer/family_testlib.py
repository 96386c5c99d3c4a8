"""Tiny (< 1M parameters) models of every causal-LM family the trainer is tested on, with the
vocabulary of a real tokenizer (../shared/tokenizers/llama2, 32000 ids), built from configs.

Sizes: hidden 16, 2 layers, 2 heads of 8 (1 KV head where the family has GQA), tied embeddings
(32000 x 16 = 512k of the parameters), 128 positions, weights drawn with std 0.2 (at 0.02 the
logits of a 16-wide model are ~0.1 apart and a LoRA on it cannot lower the loss measurably).
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 32000
COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              initializer_range=0.2)  # 10x the usual: logits a LoRA can move within 12 steps

# model_type -> config overrides (beyond COMMON)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 64},
    "gemma3_text": {"head_dim": 8, "sliding_window": 64},
    "phi3": {},
    "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 128, "n_inner": 32},
    "gpt_neox": {},
    "falcon": {"new_decoder_architecture": False, "multi_query": True},
    "olmo2": {},
}


def family_config(model_type: str, **overrides):
    from transformers import CONFIG_MAPPING
    return CONFIG_MAPPING[model_type](**{**COMMON, **FAMILIES[model_type], **overrides})


def build_family_model(out_dir: Path, model_type: str, *, seed: int = 0, **overrides):
    """Save a tiny random `model_type` model (fp32) to `out_dir`; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **overrides))
    model.save_pretrained(str(out_dir))
    return model
