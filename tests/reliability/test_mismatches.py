"""Issue 7 item 7: data/model mismatches are refused before step 1 (exit 2, one
"trainer: error before step 1: ..." line, no training log), by the real command line.

Already covered elsewhere and not repeated: token id >= embedding rows end to end
(tests/trainer/test_e2e.py::test_token_id_beyond_vocab_fails_before_step_1) and the check functions
themselves (tests/trainer/test_setup.py: test_token_id_beyond_embedding_rejected,
test_tokenizer_hash_mismatch_errors_unless_overridden,
test_added_tokens_keep_existing_and_must_match_manifest). Added here, end to end: a dataset encoded
with another tokenizer, added-token ids differing from the manifest (with --add_tokens), and
samples longer than the model's positions.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from reliability_testlib import REPO
from trainer_testlib import build_model, build_tokenizer, run_env, write_dataset


@pytest.fixture(scope="module")
def cases(trainer_assets, tmp_path_factory) -> dict:
    """Every mismatch case's trainer run, started together (start-up dominates)."""
    root = tmp_path_factory.mktemp("mismatch")
    tok, llama = trainer_assets["tokenizer"], trainer_assets["llama"]
    runs = {}

    # 1. the manifest records another tokenizer (same size, different vocab_hash)
    info = {"path": "other", "class": "X", "len": len(tok), "bos_id": 1, "eos_id": 2,
            "pad_id": 3, "added_tokens": {}, "vocab_hash": "0123456789abcdef"}
    data = write_dataset(root / "data", "other_tok", tok, num_samples=8, tokenizer_info=info)
    runs["other_tokenizer"] = (llama, data, [])

    # 2. the data was encoded with <tool>=124, <obs>=125; the model's tokenizer (saved by an
    #    earlier run that added them in the other order) has <obs>=124, <tool>=125
    enc_tok = build_tokenizer(root / "enc_tok")
    enc_tok.add_tokens(["<tool>", "<obs>"], special_tokens=True)
    data = write_dataset(root / "data", "tools", enc_tok, num_samples=8, extra_ids=[124, 125])
    model = root / "model_swapped"
    shutil.copytree(llama, model)
    swapped = build_tokenizer(model)
    swapped.add_tokens(["<obs>", "<tool>"], special_tokens=True)
    swapped.save_pretrained(str(model))
    runs["added_token_ids_differ"] = (model, data, ["--add_tokens", "<tool>,<obs>"])

    # 3. samples of up to 64 tokens, a model with 32 positions
    short = root / "model_32pos"
    build_model(short, vocab_size=len(tok), max_positions=32)
    tok.save_pretrained(str(short))
    runs["longer_than_positions"] = (short, trainer_assets["train"], [])

    procs = {}
    for name, (model_dir, data_dir, extra) in runs.items():
        out = root / "out" / name
        cmd = [sys.executable, str(REPO / "trainer" / "train.py"), "--model_path", str(model_dir),
               "--data_path", str(data_dir), "--output_path", str(out), "--max_steps", "2",
               "--precision", "fp32", *extra]
        procs[name] = (out, subprocess.Popen(cmd, cwd=REPO, env=run_env(), text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for name, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        results[name] = (out, proc.returncode, err)
    return results


@pytest.mark.parametrize("name,needles", [
    ("other_tokenizer", ["was encoded with tokenizer 'other'", "vocab_hash 0123456789abcdef",
                         "--ignore_tokenizer_mismatch"]),
    ("added_token_ids_differ", ["added tokens disagree between the dataset manifest and the "
                                "tokenizer", "'<tool>': data id 124, tokenizer id 125"]),
    ("longer_than_positions", ["--data_path", "the model has 32 positions",
                               "re-encode with --max_length <= 32"]),
])
def test_mismatch_refused_before_step_1(name, needles, cases):
    out, code, err = cases[name]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    [line] = [l for l in err.splitlines() if l.startswith("trainer: error before step 1: ")]
    for needle in needles:
        assert needle in line, (needle, line)
    assert not out.exists() or not list(out.rglob("train_log.jsonl"))
