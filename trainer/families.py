"""What the trainer knows per model family (`config.model_type`): one home for the checked lists.

Each list names the model types a trainer feature has been checked for; a type missing from a list
gets the general path (with one info line saying so), never a wrong result:

* VARLEN_MODEL_TYPES: attention layers call transformers' AttentionInterface with the forward's
  keyword arguments, so `sdpa_varlen` (trainer/attention.py) receives the document boundaries.
  Checked by tests/trainer/test_packing.py (llama, qwen2) and tests/trainer/test_families.py
  (packed == documents run separately, <= 1e-5, for every family listed here).
* FUSED_MODEL_TYPES: the causal-LM forward is exactly `logits = lm_head(hidden_states)` unless one
  of LOGIT_TRANSFORM_ATTRS is set in the config (Gemma's final soft-capping), so the fused head
  (trainer/loss.py) is exact. Gemma3 and Falcon are not on the varlen list: Gemma3's sliding layers
  (and Falcon's own attention code) do not take the document boundaries. Checked against full logits by tests/trainer/test_fused_loss.py
  and tests/trainer/test_families.py.
"""

from __future__ import annotations

VARLEN_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3",
                                "qwen3_moe", "phi3", "olmo2", "gpt_neox", "gpt2"})
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3",
                               "qwen3_moe", "phi3", "olmo2", "gpt_neox", "gpt2", "falcon", "gemma2",
                               "gemma3_text"})
# Config attributes that change the logits after the head; the fused head is refused when set
# (Gemma2's final_logit_softcapping defaults to 30, Gemma3's to None).
LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
