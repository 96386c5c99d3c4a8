"""The glaive tool-call demo data (English and Chinese) encodes with the qwen3 chat template and
trains a tiny model for a few steps (1 process); trainer.generate then formats a tool conversation
exactly like training and stops at <|im_end|>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer_testlib import REPO, run_train

SHARED = REPO.parent / "shared"
GLAIVE = {"en": SHARED / "data" / "glaive_toolcall_en_demo.json",
          "zh": SHARED / "data" / "glaive_toolcall_zh_demo.json"}
QWEN3 = SHARED / "tokenizers" / "qwen3"


@pytest.mark.slow
def test_glaive_encodes_trains_and_generates(tmp_path, capsys):
    if not QWEN3.is_dir() or not all(p.is_file() for p in GLAIVE.values()):
        pytest.skip(f"{SHARED} (qwen3 tokenizer, glaive demo data) absent")
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from encoder.main import main as encode_main
    # both files in one run (one tokenizer load); the Chinese file has 2 rows whose
    # "observation" follows no function_call: --skip_invalid counts and reports them
    assert encode_main(["--tokenizer_path", str(QWEN3), "--encode_type", "chat",
                        "--data_loader_path", str(REPO / "encoder/user_data_loader/sharegpt.py"),
                        "--data_loader_args", f"path={GLAIVE['en']},{GLAIVE['zh']}",
                        "--output_path", str(tmp_path), "--corpus_name", "glaive",
                        "--max_length", "1024", "--merge_data", "--skip_invalid"]) == 0
    data = [str(tmp_path / "glaive")]
    stats = json.loads((tmp_path / "glaive" / "stats.json").read_text())
    assert stats["rows"] == 600 and stats["skipped_invalid"] == 2
    assert stats["samples"] > 100
    capsys.readouterr()

    tok = AutoTokenizer.from_pretrained(QWEN3)
    model_dir = tmp_path / "tiny_qwen"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    proc = run_train(["--model_path", str(model_dir), "--data_path", *data, "--output_path",
                      str(out), "--max_steps", "3", "--save_steps", "3", "--learning_rate", "1e-3",
                      "--logging_steps", "1", "--precision", "fp32", "--num_workers", "1",
                      "--seed", "1"], timeout=600)
    ckpt = next(out.iterdir()) / "checkpoints" / "step_3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["loss_history"]]
    assert len(losses) == 3 and all(l == l and l > 0 for l in losses), proc.stdout[-2000:]

    from trainer.generate import (generate_one, load_model_for_generation, load_prompt_format,
                                  make_prompt_encoder)
    from trainer.generate import row_messages
    fmt = load_prompt_format(ckpt, template=None)
    assert fmt["template"] == "chat"
    model, tokenizer, tok_dir = load_model_for_generation(ckpt, None)
    encoder = make_prompt_encoder(tokenizer, tok_dir, fmt)
    record = json.loads(GLAIVE["en"].read_text())[0]
    tools = json.loads(record["tools"])
    row = {"tools": tools, "messages": [
        {"role": "user", "content": record["conversations"][0]["value"]}]}
    messages, _ = row_messages(row)
    text, prompt = generate_one(model, tokenizer, encoder, messages, max_new_tokens=3,
                                temperature=0.0, stream=False)
    expected = tok.apply_chat_template(row["messages"], tools=messages.tools, tokenize=False,
                                       add_generation_prompt=True)
    assert tokenizer.decode(prompt) == expected and "<tools>" in expected
    assert tok.convert_tokens_to_ids("<|im_end|>") in encoder.end_ids     # stops at end-of-turn
