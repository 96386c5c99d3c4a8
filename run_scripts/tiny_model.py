"""A tiny Llama for CPU runs: config (and random weights) sized to a tokenizer, saved with it.

    python run_scripts/tiny_model.py --tokenizer ../shared/tokenizers/llama2 --output base/
    python run_scripts/tiny_model.py --tokenizer tok/ --output cfg/ --config_only   # --from_scratch

Llama layout (untied input/output embeddings, as Llama-2), 2 layers, hidden 64: ~4.2M parameters
with a 32000-token vocabulary, almost all of them embeddings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer dir")
    ap.add_argument("--output", required=True)
    ap.add_argument("--hidden_size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max_positions", type=int, default=512)
    ap.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    ap.add_argument("--config_only", action="store_true", help="save the config only (train with "
                    "--from_scratch)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden_size,
                         intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.max_positions, tie_word_embeddings=args.tie,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    out = Path(args.output)
    if args.config_only:
        config.save_pretrained(out)
    else:
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        print(f"tiny Llama: {sum(p.numel() for p in model.parameters()):,} parameters")
    tok.save_pretrained(out)
    print(f"{'config' if args.config_only else 'model'} + tokenizer ({len(tok)} tokens) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
