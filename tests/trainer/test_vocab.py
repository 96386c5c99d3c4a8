"""trainer/vocab.py: --tokenizer_path extension check, embedding growth with decompose/mean init,
LoRA training of the new rows, and one end-to-end LoRA run on an extended llama2 tokenizer
(resize logged once and recorded, adapter + tokenizer reload exactly, export, generate)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from trainer_testlib import REPO, only_run_dir, run_train

SHARED = REPO.parent / "shared"
LLAMA2 = SHARED / "tokenizers" / "llama2"
needs_shared = pytest.mark.skipif(not LLAMA2.is_dir(), reason="../shared/tokenizers/llama2 absent")
PIECES = ["孙悟空", "唐僧", " 取经", "师父", "妖精"]


@pytest.fixture(scope="module")
def llama2_ext(tmp_path_factory) -> dict:
    """llama2 extended with a few Chinese pieces, and tiny untied/tied models on llama2."""
    from encoder.tokenizer import main as tool_main
    root = tmp_path_factory.mktemp("vocab")
    pieces = root / "pieces.txt"
    pieces.write_text("\n".join(PIECES) + "\n")
    assert tool_main(["extend", "--base", str(LLAMA2), "--pieces", str(pieces),
                      "--output", str(root / "ext")]) == 0
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(LLAMA2)
    models = {}
    for tie in (False, True):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
        d = root / ("tied" if tie else "untied")
        LlamaForCausalLM(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        models[tie] = d
    return {"root": root, "ext": root / "ext", "untied": models[False], "tied": models[True]}


@needs_shared
def test_tokenizer_that_moves_base_ids_is_refused(llama2_ext, tmp_path):
    from transformers import AutoTokenizer

    from trainer.vocab import VocabMismatch, plan_vocab
    data = json.loads((llama2_ext["ext"] / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["▁the"], vocab["er"] = vocab["er"], vocab["▁the"]  # two base tokens swap ids
    moved = tmp_path / "moved"
    AutoTokenizer.from_pretrained(llama2_ext["ext"]).save_pretrained(moved)
    (moved / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    with pytest.raises(VocabMismatch) as e:
        plan_vocab(model_path=str(llama2_ext["untied"]), tokenizer_path=str(moved),
                   tokenizer=AutoTokenizer.from_pretrained(moved), tokenizer_source=str(moved),
                   model_vocab_size=32000, requested_init="auto", from_scratch=False)
    msg = str(e.value)
    assert "2 of its 32000 tokens have another id" in msg
    assert "id 261: model 'er', tokenizer '▁the'" in msg and "id 278: model '▁the'" in msg


@needs_shared
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_decompose_rows_are_the_mean_of_their_pieces(llama2_ext, tie):
    """Independent computation: the base tokenizer's own tokenization of the token's text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.vocab import grow_embeddings, plan_vocab
    base_dir = llama2_ext["tied" if tie else "untied"]
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    ext_tok = AutoTokenizer.from_pretrained(llama2_ext["ext"])
    plan = plan_vocab(model_path=str(base_dir), tokenizer_path=str(llama2_ext["ext"]),
                      tokenizer=ext_tok, tokenizer_source=str(llama2_ext["ext"]),
                      model_vocab_size=32000, requested_init="auto", from_scratch=False)
    assert plan.init == "decompose" and plan.base_len == 32000
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    out0 = model.get_output_embeddings().weight.detach().clone()
    resize = grow_embeddings(model, len(ext_tok), init=plan.init, why=plan.why,
                             model_tokenizer=plan.model_tokenizer, tokenizer=ext_tok, log_it=False)
    assert (resize.from_rows, resize.to_rows, resize.tied) == (32000, len(ext_tok), tie)
    assert resize.decomposed == len(ext_tok) - 32000 and resize.mean_fallback == 0
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb[:32000], emb0) and torch.equal(out[:32000], out0)
    checked = 0
    for token, new_id in ext_tok.get_vocab().items():
        if new_id < 32000:
            continue
        ids = base_tok(token.lstrip("▁").replace("▁", " "), add_special_tokens=False)["input_ids"]
        if not token.startswith("▁"):  # the tokenizer's own prefix space is not in the token
            if base_tok.convert_ids_to_tokens(ids[0]) != "▁":
                continue
            ids = ids[1:]
        torch.testing.assert_close(emb[new_id], emb0[ids].mean(0), rtol=0, atol=1e-7)
        if not tie:
            torch.testing.assert_close(out[new_id], out0[ids].mean(0), rtol=0, atol=1e-7)
        checked += 1
    assert checked >= len(PIECES)
    mean_model = AutoModelForCausalLM.from_pretrained(base_dir)
    grow_embeddings(mean_model, len(ext_tok), init="mean", why="test", log_it=False)
    w = mean_model.get_input_embeddings().weight
    assert torch.equal(w[32000:], emb0.mean(0).expand(len(ext_tok) - 32000, -1))


def test_bigger_tokenizer_beside_the_model_is_mean_and_warned(assets, caplog):
    """Today's implicit case: the original tokenizer is unknown, so decompose is impossible."""
    from transformers import AutoTokenizer

    from trainer.vocab import plan_vocab
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    with caplog.at_level(logging.WARNING, logger="trainer"):
        plan = plan_vocab(model_path=str(assets["llama"]), tokenizer_path=None, tokenizer=tok,
                          tokenizer_source=str(assets["llama"]), model_vocab_size=len(tok) - 4,
                          requested_init="auto", from_scratch=False)
    assert plan.init == "mean" and plan.base_len == len(tok) - 4
    assert f"has {len(tok)} tokens but the model has {len(tok) - 4} embedding rows" in caplog.text
    with pytest.raises(ValueError, match="--new_token_init decompose needs"):
        plan_vocab(model_path=str(assets["llama"]), tokenizer_path=None, tokenizer=tok,
                   tokenizer_source=str(assets["llama"]), model_vocab_size=len(tok) - 4,
                   requested_init="decompose", from_scratch=False)


@pytest.mark.parametrize("model", ["llama", "qwen2"])  # tied, untied
def test_lora_trains_new_rows_by_default_and_warns_otherwise(assets, model, caplog):
    from transformers import AutoModelForCausalLM

    from trainer.model import DEFAULT_LORA
    from trainer.vocab import new_row_lora_settings
    m = AutoModelForCausalLM.from_pretrained(assets[model])
    new = [120, 121, 122]
    cfg, how = new_row_lora_settings(m, dict(DEFAULT_LORA), new, user_config=False, zero3=False)
    want = {"embed_tokens": new} if model == "llama" else {"embed_tokens": new, "lm_head": new}
    assert cfg["trainable_token_indices"] == want and "trainable_token_indices" in how
    cfg, how = new_row_lora_settings(m, dict(DEFAULT_LORA), new, user_config=False, zero3=True)
    assert "modules_to_save" in how and cfg["modules_to_save"] == list(want)  # ZeRO-3 on CPU
    with caplog.at_level(logging.WARNING, logger="trainer"):
        user = {**DEFAULT_LORA, "modules_to_save": ["norm"]}
        cfg, how = new_row_lora_settings(m, user, new, user_config=True, zero3=False)
    assert cfg == user and how is None
    rows = 3 if model == "llama" else 6
    assert f"leaves {rows} new token rows untrained" in caplog.text
    caplog.clear()
    user = {**DEFAULT_LORA, "trainable_token_indices": want}
    with caplog.at_level(logging.WARNING, logger="trainer"):
        new_row_lora_settings(m, user, new, user_config=True, zero3=False)
    assert "untrained" not in caplog.text


@needs_shared
@pytest.mark.slow
def test_lora_on_extended_tokenizer_end_to_end(llama2_ext, tmp_path):
    """--tokenizer_path + --use_lora: one resize line, recorded; new rows trained (tied? no:
    untied, both matrices); the adapter reloads exactly; export merges; generate continues."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from encoder.main import main as encode_main
    from trainer.export import export, grow_like_training
    plugin = tmp_path / "zh.py"
    plugin.write_text("def data_loader():\n    for i in range(40):\n"
                      "        yield '孙悟空保着唐僧去取经，师父说那妖精来了。' * (1 + i % 3)\n")
    assert encode_main(["--tokenizer_path", str(llama2_ext["ext"]), "--data_loader_path",
                        str(plugin), "--encode_type", "pretrain", "--corpus_name", "zh",
                        "--output_path", str(tmp_path / "data"), "--max_length", "64",
                        "--merge_data"]) == 0
    out = tmp_path / "runs"
    proc = run_train(["--model_path", str(llama2_ext["untied"]), "--tokenizer_path",
                      str(llama2_ext["ext"]), "--data_path", str(tmp_path / "data" / "zh"),
                      "--output_path", str(out), "--use_lora", "--max_steps", "3",
                      "--learning_rate", "1e-2", "--logging_steps", "1", "--precision", "fp32"])
    log = proc.stdout + proc.stderr
    ext_len = len(AutoTokenizer.from_pretrained(llama2_ext["ext"]))
    assert log.count("resizing input and output embeddings") == 1
    assert f"32000 -> {ext_len} rows (+{ext_len - 32000}); init decompose" in log
    assert f"new token rows ({ext_len - 32000}) trained with LoRA via peft " \
           f"trainable_token_indices on embed_tokens and lm_head" in log
    ckpt = only_run_dir(out) / "checkpoints" / "step_3"
    vocab = json.loads((ckpt / "resolved_config.json").read_text())["vocab"]
    assert vocab["resize"]["from_rows"] == 32000 and vocab["resize"]["to_rows"] == ext_len
    assert vocab["new_token_init"] == "decompose" and vocab["model_tokenizer_len"] == 32000
    # tokenizer reloads exactly
    assert AutoTokenizer.from_pretrained(ckpt).get_vocab() == \
        AutoTokenizer.from_pretrained(llama2_ext["ext"]).get_vocab()
    # adapter reload on a base grown like training == the exported merge
    base = AutoModelForCausalLM.from_pretrained(llama2_ext["untied"])
    before = base.get_input_embeddings().weight[:32000].clone()
    grow_like_training(base, ckpt, str(llama2_ext["untied"]), AutoTokenizer.from_pretrained(ckpt))
    peft_model = PeftModel.from_pretrained(base, ckpt).eval()
    merged_dir = export(ckpt, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(ckpt)("孙悟空保着唐僧")["input_ids"]])
    assert ids.max() >= 32000
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
    rows = merged.get_input_embeddings().weight
    assert torch.equal(rows[:32000], before)            # base rows untouched (LoRA)
    from safetensors.torch import load_file
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    delta = [v for k, v in adapter.items() if "embed_tokens" in k and "trainable_tokens" in k]
    assert len(delta) == 1 and torch.equal(rows[32000:], delta[0])  # the trained rows came back
    from trainer.generate import main as generate_main
    assert generate_main(["--model", str(merged_dir), "--prompt", "孙悟空",
                          "--max_new_tokens", "4"]) == 0


def test_mismatch_message_gives_true_sizes(assets):
    """A tokenizer with one manifest token added is reported as N tokens (+1), not as N+1."""
    from transformers import AutoTokenizer

    from trainer.model import DataModelMismatch, add_manifest_tokens, check_tokenizer_matches
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    n = len(tok)
    add_manifest_tokens(tok, {"<extra>": n})
    manifests = [{"tokenizer": {"vocab_hash": "deadbeef", "path": "zh_tok", "len": 55296}}]
    with pytest.raises(DataModelMismatch) as e:
        check_tokenizer_matches(tok, manifests, ["d"], set(), ignore=False, loaded_len=n,
                                source="MODEL")
    msg = str(e.value)
    assert "'zh_tok' (55296 tokens" in msg and f"(MODEL: {n} tokens, {n + 1} with the 1 added" in msg
    assert "--tokenizer_path DIR" in msg
