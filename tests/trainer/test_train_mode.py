"""The loop trains in train mode. from_pretrained returns a model in eval mode and DeepSpeed
leaves the mode alone, so before trainer/recipe.py's engine.train() every step until the first
eval ran with the model's dropout off and --gradient_checkpointing inert (transformers
checkpoints a layer only in train mode). Measured here: the mode each decoder layer's MLP runs
in, and how often it runs (a checkpointed layer runs again in the backward pass)."""

from __future__ import annotations

import pytest

from trainer_testlib import base_args, train_in_process


@pytest.mark.parametrize("checkpointing", [False, True])
def test_layers_run_in_train_mode_and_checkpointing_recomputes(assets, tmp_path, checkpointing):
    argv = base_args(assets, tmp_path, "--max_steps", "2", "--micro_batch_size", "2",
                     "--gradient_accumulation_steps", "2", "--num_workers", "0", "--no_timestamp",
                     *(["--gradient_checkpointing"] if checkpointing else []))
    trainer, _ = train_in_process(argv, run=False)
    calls = []
    layers = trainer.engine.module.model.layers
    for layer in layers:  # transformers checkpoints a layer's forward, not its hooks: the MLP's
        layer.mlp.register_forward_pre_hook(lambda m, args: calls.append(m.training))
    state = trainer.run()
    assert state.step == 2 and all(calls), calls  # every layer call in train mode
    micro_batches = 2 * 2
    assert len(calls) == len(layers) * micro_batches * (2 if checkpointing else 1)
