"""Fixtures for the encoder tests: a hermetic tokenizer trained in-process, tiny plugin files, and
an in-process CLI runner. Real tokenizers/data from ../shared are in encoder_testlib (skip if absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import encoder_testlib  # noqa: F401  (sets HF_HUB_OFFLINE and sys.path)


@pytest.fixture(scope="session")
def hermetic_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer trained in-process, with BOS added by its post-processor
    (like Llama), saved with save_pretrained so the CLI loads it by path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France? Paris is the capital of France.",
        "Token shards store integers; training reads samples without parsing text.",
        "Write a short email to Alice about the quarterly report.",
    ] * 50
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


@pytest.fixture
def write_plugin(tmp_path):
    """write_plugin(body) -> path of a plugin file whose data_loader yields the given rows/code."""
    def make(rows: list | None = None, *, code: str | None = None, name: str = "plugin.py") -> str:
        path = tmp_path / name
        if code is None:
            code = ("import json\n\ndef data_loader():\n"
                    f"    yield from json.loads({json.dumps(json.dumps(rows))})\n")
        path.write_text(code, encoding="utf-8")
        return str(path)
    return make


@pytest.fixture
def run_cli(tmp_path, capsys):
    """run_cli(*flags) -> (exit code, stdout, stderr) of encoder.main.main, in-process."""
    from encoder.main import main

    def run(*flags: str, out: Path | None = None, corpus: str = "c") -> tuple[int, str, str]:
        argv = list(flags)
        if "--analyze" not in flags:
            argv += ["--output_path", str(out or tmp_path / "out"), "--corpus_name", corpus]
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run
