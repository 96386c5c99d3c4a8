"""trainer.export (LoRA merge with added tokens, ZeRO -> HF, full) and trainer.generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer_testlib import build_model, build_tokenizer

TOKENS = ["<tool>", "</tool>"]


def _lora_checkpoint(root: Path, *, tie: bool) -> tuple[Path, Path]:
    """A base model, and a checkpoint dir laid out as the trainer writes it for a LoRA run with
    added tokens: adapter (with trained new-token rows) + tokenizer + trainer_state.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, ckpt = root / "base", root / "ckpt"
    tok = build_tokenizer(base_dir)
    build_model(base_dir, vocab_size=len(tok), tie=tie, kind="llama" if tie else "qwen2")
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": TOKENS})
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    new_ids = tok.convert_tokens_to_ids(TOKENS)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     trainable_token_indices={"embed_tokens": new_ids})
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # pretend training moved every trainable weight
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    model.config.save_pretrained(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"args": {"model_path": str(base_dir)}}))
    return base_dir, ckpt


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("tie", [True, False])
def test_lora_with_added_tokens_merges_exactly(tmp_path, tie):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import export
    base_dir, ckpt = _lora_checkpoint(tmp_path, tie=tie)
    out = export(ckpt, tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids(["w1", "<tool>", "w2", "</tool>", "w3"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    reference = PeftModel.from_pretrained(base, ckpt).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_export_refuses_to_overwrite(tmp_path):
    from trainer.export import export
    _, ckpt = _lora_checkpoint(tmp_path, tie=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(ckpt, tmp_path / "out")


@pytest.mark.slow
def test_zero_engine_checkpoint_to_hf_and_generate(tmp_path, assets, zero2_run):
    """--save_optimizer run -> export --from_zero equals the HF weights of the same checkpoint;
    generate reproduces the model's own greedy decoding through the prompt format.

    The run is conftest.py's 2-rank ZeRO-2 run (shared with test_e2e.py), so the ZeRO shards of
    both ranks are merged. export and generate are called through their command-line main(argv)
    in this process; the demo test runs both as `python -m ...` commands."""
    from transformers import AutoModelForCausalLM

    from trainer.export import main as export_main
    from trainer.generate import main as generate_main
    ckpt = zero2_run / "checkpoints" / "step_8"
    assert (zero2_run / "checkpoints" / "latest").read_text().strip() == "step_8"
    assert export_main(["--checkpoint", str(zero2_run), "--output", str(tmp_path / "from_zero"),
                        "--from_zero"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    zero = AutoModelForCausalLM.from_pretrained(tmp_path / "from_zero",
                                                dtype=torch.float32).state_dict()
    for name, tensor in hf.items():
        torch.testing.assert_close(zero[name], tensor, atol=0, rtol=0)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"q": "w5 w6 w7", "a": "w8 w9"}) + "\n")
    assert generate_main(["--model", str(tmp_path / "from_zero"), "--prompts_file", str(prompts),
                          "--output", str(tmp_path / "g.jsonl"), "--template", "none",
                          "--max_new_tokens", "4"]) == 0
    row = json.loads((tmp_path / "g.jsonl").read_text())
    assert row["prompt"] == "w5 w6 w7" and row["expected"] == "w8 w9"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from_zero", dtype=torch.float32)
    tok = assets["tokenizer"]
    # the prompt as the encoder builds it: BOS only if the tokenizer itself adds one (this
    # word-level tokenizer does not, and the training samples have none)
    prompt_ids = tok("w5 w6 w7").input_ids
    assert prompt_ids == tok("w5 w6 w7", add_special_tokens=False).input_ids
    greedy = model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = [t for t in greedy[0, len(prompt_ids):].tolist() if t != tok.eos_token_id]
    assert row["generated"] == tok.decode(new, skip_special_tokens=True)


def test_generate_without_prompt_format_continues_plain_text(assets, capsys):
    """A pretrain model (no prompt_format.json) continues the text; a bad --template is one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.generate import main as generate_main
    assert generate_main(["--model", str(assets["llama"]), "--prompt", "w1 w2",
                          "--max_new_tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "plain text" in err and "--template" in err
    tok = AutoTokenizer.from_pretrained(str(assets["llama"]))
    model = AutoModelForCausalLM.from_pretrained(str(assets["llama"]))
    ids = tok("w1 w2")["input_ids"]
    want = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):]
    want = [t for t in want.tolist() if t != tok.eos_token_id]
    assert out.splitlines()[-1].endswith(tok.decode(want, skip_special_tokens=True))
    capsys.readouterr()
    assert generate_main(["--model", str(assets["llama"]), "--prompt", "w1",
                          "--template", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--template nope" in err and "Traceback" not in err
