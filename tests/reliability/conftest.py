"""Fixtures for the fault-injection tests: a hermetic tokenizer (trained in-process, like the
encoder tests' fixture) and tiny trainer assets (via tests/trainer/trainer_testlib.py). Helpers
live in reliability_testlib.py (a uniquely named module: every test dir has a conftest)."""

from __future__ import annotations


import pytest

import reliability_testlib  # noqa: F401  (sets sys.path for trainer_testlib, offline env)


# ---------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="session")
def hermetic_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer trained in-process, BOS added by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The quick brown fox jumps over the lazy dog.",
              "What is the capital of France? Paris is the capital of France.",
              "Token shards store integers; training reads samples without parsing text.",
              "Write a short email to Alice about the quarterly report."] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    out = tmp_path_factory.mktemp("hermetic_tok")
    fast.save_pretrained(str(out))
    return str(out)


# ---------------------------------------------------------------------------------- trainer assets
@pytest.fixture(scope="session")
def trainer_assets(tmp_path_factory) -> dict:
    """Tiny llama (tied) + its word-level tokenizer + a 96-sample packed dataset."""
    from trainer_testlib import build_model, build_tokenizer, write_dataset
    root = tmp_path_factory.mktemp("trainer_assets")
    tok = build_tokenizer(root / "llama")
    build_model(root / "llama", vocab_size=len(tok))
    train = write_dataset(root / "data", "train", tok, num_samples=96, seed=1)
    return {"root": root, "tokenizer": tok, "llama": root / "llama", "train": train}


