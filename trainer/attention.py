"""`sdpa_varlen`: packed documents attend within themselves, one SDPA call per document.

With plain `sdpa`, a packed row gets a dense block-diagonal causal mask: L x L booleans per row
(4 MB at 2048, 64 MB at 8192) and an attention kernel that computes every block, masked or not.
Measured here (CPU, 1 thread, 4 heads x 16 dims, forward + backward of one 2048-token row holding
8 documents of 256): 0.28 s with the mask, 0.03 s for the 8 documents separately
(`bench/train_throughput.py` shows the effect on a whole step). `sdpa_varlen` does the latter
without touching the model code: the micro-batch is flattened into one row (like flash-attn's
varlen path, no padding at all), the collate passes the document boundaries as
`cu_seq_lens_q`/`cu_seq_lens_k` (the keyword names transformers' flash-attention path uses), and
this function, registered with transformers' AttentionInterface under the name "sdpa_varlen", runs
causal SDPA on each document. The result equals `sdpa` with the mask (tests/trainer/test_packing.py).

Without boundaries (generation, or any caller that passes none) it is plain `sdpa`. The name is
only used inside the trainer: saved checkpoints record "sdpa" in their config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.errors import UsageError
from trainer.families import VARLEN_MODEL_TYPES  # noqa: F401  (re-exported: the checked list)

VARLEN_SDPA = "sdpa_varlen"


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """query (1, H, N, D), key/value (1, H_kv, N, D), documents at cu_seq_lens_q -> (1, N, H, D)."""
    if cu_seq_lens_q is None or attention_mask is not None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    bounds = cu_seq_lens_q.tolist()
    window = getattr(module, "sliding_window", None)
    if window and max(e - s for s, e in zip(bounds[:-1], bounds[1:])) > window:
        raise UsageError(f"--attn_implementation sdpa_varlen: a document is longer than this layer's "
                         f"sliding window ({window} tokens), which it does not apply; use "
                         f"--attn_implementation sdpa (or flash_attention_2 on a GPU)")
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                            dropout_p=dropout if module.training else 0.0,
                                            scale=scaling, is_causal=True, enable_gqa=gqa)
             for s, e in zip(bounds[:-1], bounds[1:])]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register_varlen_sdpa() -> None:
    """Make "sdpa_varlen" a valid `attn_implementation` for transformers (idempotent).

    Its mask function is flash-attention's: for a flattened row without padding the model builds
    no mask at all.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, flash_attention_mask)


def document_bounds(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths of a flattened row: segment ids [[0,0,1,1,1,2]] -> [0,2,5,6]."""
    _, counts = torch.unique_consecutive(segment_ids[0], return_counts=True)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
