"""LLaMA-Factory's dpo_en_demo.json and dpo_zh_demo.json (300 ShareGPT pairs each) through the
bundled plugin (encoder/user_data_loader/dpo_sharegpt.py, llama2 tokenizer and template, 128
tokens a sequence) and into `--objective dpo` on a tiny llama with llama2's vocabulary: every row
is either a pair on disk or counted as dropped (the count equal to an independent one from an
untruncated encode), and DPO trains on the en + zh mix: the first step is exactly ln 2 (policy ==
reference), and TRL's metrics and the per-source pair counts reach the JSONL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainer_testlib import train_in_process

REPO = Path(__file__).resolve().parents[2]
MAX_LENGTH = 128


def _encode(shared: Path, out: Path, name: str, *extra: str) -> Path:
    from encoder.main import main as encode_main
    assert encode_main([
        "--tokenizer_path", str(shared / "tokenizers" / "llama2"), "--encode_type", "preference",
        "--template", "llama2", "--data_loader_path",
        str(REPO / "encoder" / "user_data_loader" / "dpo_sharegpt.py"), "--data_loader_args",
        f"path={shared / 'data' / f'dpo_{name}_demo.json'}", "--output_path", str(out),
        "--corpus_name", name, *extra]) == 0
    return out / name


@pytest.fixture(scope="module")
def dpo_demo(shared_dir, tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from family_testlib import build_family_model
    root = tmp_path_factory.mktemp("dpo_demo")
    data = {name: _encode(shared_dir, root / "data", name, "--max_length", str(MAX_LENGTH),
                          "--truncation", "right") for name in ("en", "zh")}
    full = {name: _encode(shared_dir, root / "full", name, "--max_length", "100000")
            for name in ("en", "zh")}
    build_family_model(root / "model", "llama")
    AutoTokenizer.from_pretrained(str(shared_dir / "tokenizers" / "llama2")).save_pretrained(
        str(root / "model"))
    return {"root": root, "model": root / "model", "data": data, "full": full}


@pytest.mark.parametrize("name", ["en", "zh"])
def test_every_row_is_a_pair_or_counted(dpo_demo, name):
    """--truncation right drops a pair when a side's response would start past 128 tokens (its
    cut would keep no trained token); the count equals the one read off the untruncated encode."""
    from shardfmt import open_dataset
    from shardfmt.preference import pair_counts, read_pairs
    from shardfmt.verify import verify_dataset
    ds, full = open_dataset(dpo_demo["data"][name]), open_dataset(dpo_demo["full"][name])
    stats, full_stats = ds.manifest["metadata"]["stats"], full.manifest["metadata"]["stats"]
    assert stats["rows"] == full_stats["rows"] == 300 and full_stats["dropped"] == 0
    full_pairs = [p for i in range(len(full)) for p in read_pairs(full, i)]
    assert len(full_pairs) == 300
    late = sum(1 for p in full_pairs
               if any(int(np.argmax(s.loss_mask)) >= MAX_LENGTH for s in (p.chosen, p.rejected)))
    assert stats["dropped"] == late and int(pair_counts(ds).sum()) == 300 - late
    assert verify_dataset(ds) == []


def test_dpo_trains_on_the_en_zh_mix(dpo_demo, tmp_path):
    d = dpo_demo
    _, state = train_in_process([
        "--model_path", str(d["model"]), "--data_path", "0.5", str(d["data"]["en"]), "0.5",
        str(d["data"]["zh"]), "--output_path", str(tmp_path), "--save_name", "dpo",
        "--objective", "dpo", "--beta", "0.1", "--max_steps", "3", "--micro_batch_size", "2",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "5", "--precision", "fp32",
        "--num_workers", "0", "--no_timestamp"])
    log = [json.loads(line) for line in (tmp_path / "dpo" / "train_log.jsonl").read_text()
           .splitlines()]
    assert len(log) == 3 and abs(log[0]["loss"] - math.log(2)) < 1e-6
    for r in log:
        assert r["pairs/en"] + r["pairs/zh"] == 2 and r["pairs/en"] == r["pairs/zh"] == 1
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                    "rewards/margins", "logps/chosen", "logps/rejected"):
            assert math.isfinite(r[key]), (key, r)
    assert log[0]["rewards/margins"] == 0.0    # step 1: policy == reference
