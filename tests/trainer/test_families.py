"""Every model family on tiny configs (tests/trainer/family_testlib.py, the llama2 tokenizer's
32000-id vocabulary): default LoRA targets, attention `auto`, packing isolation for every attention
path the trainer uses, the fused head, and (slow) the training matrix (full, LoRA) x packed data:
loss falls, the checkpoint reloads, export merges, generate runs.

The matrix runs the trainer in this process (trainer.recipe.Trainer), one tiny model per family
shared by the full and the LoRA run; `pytest -s` prints the table of what each family ran.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from family_testlib import FAMILIES, build_family_model, family_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama2_tokenizer(shared_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(shared_dir / "tokenizers" / "llama2"))


def _model(model_type: str, impl: str = "eager"):
    from transformers import AutoModelForCausalLM

    from trainer.attention import register_varlen_sdpa
    register_varlen_sdpa()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(model_type), attn_implementation=impl)


# ------------------------------------------------------------------------ LoRA targets (fast)
EXPECTED_TARGETS = {  # all Linear/Conv1D layers but the output layer
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "falcon": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "qwen2_moe": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "shared_expert_gate",
                  "up_proj", "v_proj"],
    "qwen3_moe": ["k_proj", "o_proj", "q_proj", "v_proj"],
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_default_lora_targets_wrap_every_linear(model_type):
    """Every Linear (and GPT-2 Conv1D) but the output layer gets an adapter; MoE experts too."""
    from peft import LoraConfig, get_peft_model

    from trainer.lora import linear_modules, resolve_lora_targets, wrapped_modules
    from trainer.model import DEFAULT_LORA
    model = _model(model_type)
    cfg = resolve_lora_targets(model, dict(DEFAULT_LORA))
    n_linear = len(linear_modules(model))
    if model_type in EXPECTED_TARGETS:
        assert cfg["target_modules"] == EXPECTED_TARGETS[model_type]
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg))
    wrapped = set(wrapped_modules(peft_model))
    assert set(cfg["target_modules"]) <= wrapped
    head = peft_model.get_output_embeddings()
    assert type(head) is torch.nn.Linear  # the output layer is never adapted
    n_adapted = sum(1 for _, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and not hasattr(m, "parameter_name"))
    assert n_adapted == n_linear
    if model_type.endswith("_moe"):
        assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
        assert {"experts.down_proj", "experts.gate_up_proj"} <= wrapped


def test_lora_target_list_matching_nothing_lists_existing_names():
    from trainer.lora import LoraTargetError, resolve_lora_targets
    with pytest.raises(LoraTargetError) as err:
        resolve_lora_targets(_model("gpt_neox"), {"target_modules": ["q_proj", "v_proj"]})
    msg = str(err.value)
    assert "['q_proj', 'v_proj']" in msg
    assert "dense, dense_4h_to_h, dense_h_to_4h, query_key_value" in msg


def test_lora_target_list_partly_matching_warns_naming_the_rest(caplog):
    from trainer.lora import resolve_lora_targets
    with caplog.at_level(logging.WARNING, logger="trainer"):
        cfg = resolve_lora_targets(_model("llama"), {"target_modules": ["q_proj", "v_proj"]})
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    text = caplog.text
    assert "model.layers.*.self_attn: k_proj, o_proj not adapted" in text
    assert "mlp" not in text  # a block with nothing chosen is left alone, not warned about


def test_lora_all_linear_string_and_regex():
    from trainer.lora import LoraTargetError, resolve_lora_targets
    model = _model("phi3")
    assert resolve_lora_targets(model, {"target_modules": "all-linear"})["target_modules"] == \
        EXPECTED_TARGETS["phi3"]
    assert resolve_lora_targets(model, {"target_modules": r".*\.qkv_proj"})
    with pytest.raises(LoraTargetError, match="gate_up_proj, o_proj, qkv_proj"):
        resolve_lora_targets(model, {"target_modules": r".*\.q_proj"})


# ------------------------------------------------------------------------ attention auto (fast)
AUTO_CHOICE = {"gemma2": "eager", "gemma3_text": "sdpa", "falcon": "sdpa"}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_auto_attention_is_supported_and_logged(model_type, caplog):
    from trainer.model import resolve_attn_implementation
    with caplog.at_level(logging.INFO, logger="trainer"):
        choice = resolve_attn_implementation("auto", family_config(model_type))
    assert choice == AUTO_CHOICE.get(model_type, "sdpa_varlen")  # no GPU / flash-attn here
    lines = [r for r in caplog.records if "--attn_implementation auto" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    _model(model_type, choice)  # transformers accepts it


def test_unsupported_attention_is_refused_with_the_fix():
    from trainer.model import resolve_attn_implementation
    with pytest.raises(ValueError, match="Gemma2ForCausalLM does not support sdpa.*auto or eager"):
        resolve_attn_implementation("sdpa", family_config("gemma2"))


# ------------------------------------------------------------- packing isolation + fused (fast)
def _docs(vocab: int = 32000):
    from shardfmt import Sample
    rng = np.random.default_rng(7)
    docs = [rng.integers(4, vocab, n).astype(np.int32) for n in (7, 12, 5)]
    masks = [rng.random(len(d)) > 0.2 for d in docs]
    packed = Sample(np.concatenate(docs), np.concatenate(masks),
                    np.array([len(d) for d in docs], dtype=np.int32))
    alone = [Sample(d, m, np.array([len(d)], np.int32)) for d, m in zip(docs, masks)]
    return packed, alone


def _paths(model_type: str) -> list[str]:
    """Every attention path the trainer can use for this family: auto's choice, sdpa, eager."""
    from trainer.model import resolve_attn_implementation
    auto = resolve_attn_implementation("auto", family_config(model_type))
    model_cls_ok = auto != "eager"
    return sorted({auto, "eager"} | ({"sdpa"} if model_cls_ok else set()))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_packed_logits_equal_documents_alone(model_type):
    """Packed (flattened for varlen) logits == each document run alone, <= 1e-5, on every path;
    the fused head's loss == the full-logits loss where the fused head is used."""
    from trainer.data import FLATTENED_ATTENTION, collate, model_inputs
    from trainer.loss import forward_loss_sum, fused_head_problem, token_loss_sum
    packed, alone = _docs()
    reference = _model(model_type, "eager").eval()
    state = reference.state_dict()
    with torch.no_grad():
        want = [reference(**model_inputs(collate([s]), "eager", torch.float32, CPU)).logits[0]
                for s in alone]
    for impl in _paths(model_type):
        model = _model(model_type, impl).eval()
        model.load_state_dict(state)
        batch = collate([packed], flatten=impl in FLATTENED_ATTENTION)
        inputs = model_inputs(batch, impl, torch.float32, CPU)
        with torch.no_grad():
            got = model(**inputs).logits[0]
            full = float(token_loss_sum(model(**inputs).logits, batch["labels"]))
            fused = None if fused_head_problem(model) else float(
                forward_loss_sum(model, inputs, batch["labels"], fused=True))
        start = 0
        for w in want:
            diff = float((got[start:start + len(w)] - w).abs().max())
            assert diff <= 1e-5, (model_type, impl, diff)
            start += len(w)
        if fused is not None:
            assert abs(fused - full) <= 1e-6 * abs(full) + 1e-5, (model_type, impl, fused, full)
    assert (fused_head_problem(reference) is None) == (model_type != "gemma2")


# ------------------------------------------------------------------------ the matrix (slow)
def _write_data(root, tokenizer):
    from trainer_testlib import write_dataset
    return write_dataset(root, "train", tokenizer, num_samples=48, seed=1, max_length=64)


def run_in_process(argv: list[str]):
    """trainer/train.py's Trainer in this process (1 rank); returns (trainer, final state)."""
    from trainer_testlib import train_in_process
    return train_in_process(argv)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


SUMMARY: dict[str, dict] = {}


@pytest.fixture(scope="module")
def matrix_data(tmp_path_factory, llama2_tokenizer):
    root = tmp_path_factory.mktemp("families")
    return root, _write_data(root / "data", llama2_tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_trains_full_and_lora(model_type, matrix_data, llama2_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.export import export
    from trainer.generate import load_model_for_generation as load_for_generation
    from trainer.lora import wrapped_modules
    root, data = matrix_data
    model_dir = tmp_path / "model"
    build_family_model(model_dir, model_type)
    llama2_tokenizer.save_pretrained(str(model_dir))
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 16]])
    row = {}
    for mode in ("full", "lora"):
        extra = ["--use_lora"] if mode == "lora" else []
        trainer, state = run_in_process([
            "--model_path", str(model_dir), "--data_path", str(data), "--output_path",
            str(tmp_path / mode), "--no_timestamp", "--max_steps", "12", "--micro_batch_size", "4",
            "--lr_scheduler", "constant", "--precision", "fp32", "--num_workers", "0",
            "--logging_steps", "6", "--seed", "3", "--learning_rate", "1e-2", *extra])
        losses = [h["loss"] for h in state.loss_history]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, (model_type, mode, losses)
        trained = trainer.engine.module.eval()
        ckpt = tmp_path / mode / "run" / "checkpoints" / "step_12"
        if mode == "full":
            reloaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        else:
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            reloaded = PeftModel.from_pretrained(base, ckpt)
        want = _logits(trained, ids)
        assert float((_logits(reloaded.eval(), ids) - want).abs().max()) <= 1e-5
        out = export(ckpt, tmp_path / f"export_{mode}")
        exported, tokenizer, _ = load_for_generation(out, None)
        assert float((_logits(exported, ids) - want).abs().max()) <= 1e-4
        generated = exported.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                      do_sample=False, pad_token_id=0)
        assert generated.shape == (1, ids.shape[1] + 4)
        row[mode] = {"loss": [round(losses[0], 3), round(losses[-1], 3)], "attn": trainer.attn,
                     "fused_head": trainer.fused_loss}
        if mode == "lora":
            row[mode]["lora_modules"] = wrapped_modules(trained)
        del trainer
    SUMMARY[model_type] = row
    print(f"\nFAMILY {model_type}: {json.dumps(row)}")
