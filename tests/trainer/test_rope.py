"""--rope_scaling: configs, the data-vs-model check at the scaled limit, and a 256-position model
training on 1024-token samples with YaRN x4 (full and LoRA; checkpoint and export configs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer_testlib import build_model, build_tokenizer, counting_doc, run_train


@pytest.fixture(scope="module")
def long_assets(tmp_path_factory):
    from shardfmt import ShardWriter, tokenizer_identity
    root = tmp_path_factory.mktemp("rope")
    tok = build_tokenizer(root / "llama")
    build_model(root / "llama", vocab_size=len(tok), max_positions=256)
    rng = np.random.default_rng(0)
    with ShardWriter(root / "data", "long", dtype="uint16", encode_type="pretrain",
                     max_length=1024, tokenizer_info=tokenizer_identity(tok), packing="bfd",
                     overwrite=True) as w:
        for _ in range(8):  # one 1024-token document per sample
            w.add_sample([(counting_doc(rng, 1024), np.ones(1024, dtype=bool))])
    return {"llama": root / "llama", "train": root / "data" / "long", "root": root}


def _args(assets, out, *extra):
    return ["--model_path", str(assets["llama"]), "--data_path", str(assets["train"]),
            "--output_path", str(out), "--no_timestamp", "--max_steps", "4",
            "--micro_batch_size", "2", "--learning_rate", "1e-2", "--lr_scheduler", "constant",
            "--precision", "fp32", "--num_workers", "0", "--logging_steps", "1", *extra]


def test_config_changes_per_kind():
    from transformers import LlamaConfig

    from trainer.rope import apply_rope_scaling, position_limit
    base = LlamaConfig(max_position_embeddings=256)
    yarn = apply_rope_scaling(base, kind="yarn", factor=4, original_max_positions=None)
    assert yarn.max_position_embeddings == 1024 and base.max_position_embeddings == 256
    assert yarn.rope_parameters["rope_type"] == "yarn" and yarn.rope_parameters["factor"] == 4.0
    assert yarn.rope_parameters["original_max_position_embeddings"] == 256
    dyn = apply_rope_scaling(base, kind="dynamic", factor=2, original_max_positions=None)
    assert dyn.max_position_embeddings == 256 and position_limit(dyn) == 512
    l3 = apply_rope_scaling(base, kind="llama3", factor=8, original_max_positions=128)
    assert l3.max_position_embeddings == 1024 and l3.rope_parameters["high_freq_factor"] == 4.0
    lin = apply_rope_scaling(base, kind="linear", factor=2, original_max_positions=None)
    assert lin.max_position_embeddings == 512 and lin.rope_parameters["rope_type"] == "linear"
    from transformers import AutoModelForCausalLM  # every kind builds and runs
    import torch
    for cfg in (yarn, dyn, l3, lin):
        cfg = cfg.__class__(**{**cfg.to_dict(), "hidden_size": 16, "intermediate_size": 32,
                               "num_hidden_layers": 1, "num_attention_heads": 2,
                               "num_key_value_heads": 1, "vocab_size": 50})
        AutoModelForCausalLM.from_config(cfg)(torch.tensor([[1, 2, 3]]))


def test_models_without_rope_are_refused():
    from transformers import FalconConfig, GPT2Config

    from trainer.rope import RopeScalingError, apply_rope_scaling
    with pytest.raises(RopeScalingError, match="'gpt2' has no rotary position embeddings"):
        apply_rope_scaling(GPT2Config(), kind="yarn", factor=4, original_max_positions=None)
    with pytest.raises(RopeScalingError, match="ALiBi"):
        apply_rope_scaling(FalconConfig(alibi=True), kind="linear", factor=2,
                           original_max_positions=None)


def test_flags_are_validated(long_assets, tmp_path):
    from trainer.args import parse_args, validate_args
    text = "\n".join(validate_args(parse_args(_args(long_assets, tmp_path, "--rope_factor", "4"))))
    assert "--rope_factor given without --rope_scaling" in text
    text = "\n".join(validate_args(parse_args(_args(long_assets, tmp_path, "--rope_scaling", "yarn"))))
    assert "--rope_scaling yarn needs --rope_factor" in text


def test_long_samples_refused_without_scaling(long_assets, tmp_path):
    proc = run_train(_args(long_assets, tmp_path), check=False)
    assert proc.returncode == 2
    assert "samples up to 1024 tokens but the model has 256 positions" in proc.stderr
    assert "--rope_scaling yarn --rope_factor 4" in proc.stderr


@pytest.mark.slow
def test_yarn_x4_trains_on_1024_token_samples(long_assets, tmp_path):
    from transformers import AutoConfig

    from trainer.export import export
    from trainer_testlib import train_in_process
    for mode in ("full", "lora"):
        extra = ["--use_lora"] if mode == "lora" else []
        trainer, state = train_in_process(_args(long_assets, tmp_path / mode, "--rope_scaling",
                                                "yarn", "--rope_factor", "4", *extra))
        assert trainer.engine.module.config.max_position_embeddings == 1024
        history = [h["loss"] for h in state.loss_history]
        assert history[-1] < history[0], history
        ckpt = tmp_path / mode / "run" / "checkpoints" / "step_4"
        resolved = json.loads((ckpt / "resolved_config.json").read_text())
        assert resolved["rope_parameters"]["rope_type"] == "yarn"
        if mode == "full":
            cfg = AutoConfig.from_pretrained(ckpt)
            assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 4
        out = export(ckpt, tmp_path / f"export_{mode}")
        cfg = AutoConfig.from_pretrained(out)
        assert cfg.max_position_embeddings == 1024
        assert cfg.rope_parameters["rope_type"] == "yarn"
        assert cfg.rope_parameters["original_max_position_embeddings"] == 256
