"""The benchmark scripts' own logic (their numbers live in docs/BENCHMARKS.md, not in tests):
the GPU script's MFU arithmetic and CPU code path, its skip without CUDA, the encode benchmark's
distinct data copies."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_peak_table_matches_device_names():
    gpu = load_bench("gpu_throughput")
    assert gpu.peak_for("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_for("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_for("NVIDIA A10G") is None          # unknown here: --peak_tflops
    assert gpu.peak_for("NVIDIA L40S") == 362.0 and gpu.peak_for("NVIDIA L4") == 121.0


def test_gpu_script_cpu_code_path_and_mfu(tmp_path):
    """Run the measuring loop on CPU (the CUDA path differs only in device, autocast dtype and
    synchronize) and check MFU = 6·N·tokens/s ÷ peak, N without the input embedding."""
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_throughput.py"),
                          "--device", "cpu", "--hidden", "64", "--layers", "1", "--vocab", "256",
                          "--seq_len", "32", "--micro_batch_size", "2", "--steps", "2",
                          "--warmup", "1", "--peak_tflops", "0.5", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["tokens_per_s_per_gpu"] > 0
    assert r["mfu"] == pytest.approx(6 * r["matmul_params"] * r["tokens_per_s_per_gpu"] / 0.5e12)
    from transformers import AutoModelForCausalLM, LlamaConfig
    gpu = load_bench("gpu_throughput")
    for tied in (True, False):
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=tied))
        total = sum(p.numel() for p in model.parameters())
        assert gpu.matmul_params(model) == (total if tied else total - 256 * 64)
    assert "| cpu |" in res.stdout


def test_gpu_script_skips_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script measures instead of skipping")
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--json",
                          str(tmp_path / "g.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("skip: no CUDA GPU")
    assert json.loads((tmp_path / "g.json").read_text()) == {"skipped": "no CUDA GPU"}


def test_encode_bench_distinct_copies(tmp_path):
    """Copies must hold the same documents with every text changed, so the tokenizer cache cannot
    serve them, and the plugins must read them like the originals."""
    enc = load_bench("encode_throughput")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "2+2", "output": "4"},
                                            {"instruction": "Sub", "input": "", "output": "0"}]))
    (src / "c.jsonl").write_text('{"text": "one"}\n{"text": "two", "id": 3}\n')
    (src / "t.txt").write_text("para one\nline\n\npara two\n")
    sys.path.insert(0, str(REPO))
    from encoder.plugins import load_plugin
    alpaca = load_plugin(str(REPO / "encoder" / "user_data_loader" / "alpaca.py"))
    text = load_plugin(str(REPO / "encoder" / "user_data_loader" / "text.py"))
    copy = enc.distinct_copy(src / "a.json", 2, tmp_path / "out")
    assert list(alpaca.fn(path=str(copy))) == [{"q": "[2] Add\n\n2+2", "a": "[2] 4"},
                                               {"q": "[2] Sub", "a": "[2] 0"}]
    assert list(text.fn(path=str(enc.distinct_copy(src / "c.jsonl", 1, tmp_path / "out")))) == \
        ["[1] one", "[1] two"]
    assert list(text.fn(path=str(enc.distinct_copy(src / "t.txt", 1, tmp_path / "out")))) == \
        ["[1] para one\nline", "[1] para two"]
    assert enc.distinct_copy(src / "a.json", 2, tmp_path / "out") == copy   # reused, not rewritten


def test_gpu_check_prints_one_skip_line_without_cuda():
    """bash bench/gpu_check.sh on a machine without CUDA: exactly one "skip:" line, exit 0."""
    import os

    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the check itself runs (minutes), not the skip")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skip: bench/gpu_check.sh needs a CUDA GPU")
