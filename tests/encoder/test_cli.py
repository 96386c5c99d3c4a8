"""End-to-end runs of the CLI (in-process), mostly on the hermetic tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from encoder_testlib import PLUGINS, REPO, check_layout, shared_data, shared_tokenizer_path
from shardfmt import open_dataset

QA_ROWS = [{"q": "What is the capital of France?", "a": "Paris is the capital of France."},
           {"q": "Write a short email to Alice.", "a": "Dear Alice, the quarterly report."},
           {"q": "What jumps over the lazy dog?", "a": "The quick brown fox.", "system": "Be brief."}]


def read_samples(path) -> list[tuple[list[int], list[bool], list[int]]]:
    ds = open_dataset(str(path))
    return [(ds[i].input_ids.tolist(), ds[i].loss_mask.tolist(), ds[i].doc_lens.tolist())
            for i in range(len(ds))]


def test_qa_roundtrip_hermetic(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer
    plugin = write_plugin(QA_ROWS)
    code, out, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                             plugin, "--encode_type", "qa", "--max_length", "128")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(hermetic_tokenizer_dir)
    ds = open_dataset(str(tmp_path / "out" / "c"))
    assert len(ds) == 3 and ds.dtype == "uint16"
    for i, row in enumerate(QA_ROWS):
        s = ds[i]
        enc = type("E", (), {"ids": s.input_ids.astype(np.int64), "mask": s.loss_mask,
                             "status": "ok"})
        check_layout(tok, enc, [row["a"]], end_id=tok.eos_token_id, expect_bos=True)
    meta = ds.manifests[0]["metadata"]
    assert meta["special_tokens"]["bos"]["policy"].startswith("once")
    assert meta["encoder"]["template"] == "none"
    stats = json.loads((tmp_path / "out" / "c" / "stats.json").read_text())
    assert stats["samples"] == 3 and stats["dropped"] == 0


def test_bad_row_names_plugin_and_row(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    plugin = write_plugin(QA_ROWS[:2] + [{"q": "no answer"}] + QA_ROWS[:1])
    flags = ("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path", plugin,
             "--encode_type", "qa", "--max_length", "128")
    code, _, err = run_cli(*flags)
    assert code == 2
    assert not (tmp_path / "out" / "c" / "manifest.json").exists()   # aborted: no manifest
    assert not list((tmp_path / "out" / "c").glob("*.bin*"))
    assert f"{plugin}: row 2: key 'a' is missing" in err and "--skip_invalid" in err
    code, out, err = run_cli(*flags, "--skip_invalid", "--overwrite")
    assert code == 0, err
    assert "skipped invalid 1" in out and "row 2: key 'a' is missing" in out


def test_plugin_exception_and_missing_plugin(run_cli, write_plugin, hermetic_tokenizer_dir):
    code_text = "def data_loader():\n    yield {'q': 'a', 'a': 'b'}\n    raise KeyError('boom')\n"
    plugin = write_plugin(code=code_text)
    base = ("--tokenizer_path", hermetic_tokenizer_dir, "--encode_type", "qa", "--max_length", "64")
    code, _, err = run_cli(*base, "--data_loader_path", plugin)
    assert code == 2 and f"{plugin}: row 1: the plugin raised KeyError" in err
    code, _, err = run_cli(*base, "--data_loader_path", "/nonexistent/plugin.py")
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    no_fn = write_plugin(code="x = 1\n", name="nofn.py")
    code, _, err = run_cli(*base, "--data_loader_path", no_fn)
    assert code == 2 and "defines no data_loader()" in err


def test_refuses_existing_corpus_without_overwrite(run_cli, write_plugin, hermetic_tokenizer_dir):
    flags = ("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
             write_plugin(QA_ROWS), "--encode_type", "qa", "--max_length", "64")
    assert run_cli(*flags)[0] == 0
    code, _, err = run_cli(*flags)
    assert code == 2 and "refusing to write" in err and "--overwrite" in err
    assert run_cli(*flags, "--overwrite")[0] == 0


def test_pretrain_exact_multiple_keeps_every_token(run_cli, write_plugin, hermetic_tokenizer_dir,
                                                  tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hermetic_tokenizer_dir)
    docs = ["The quick brown fox jumps over the lazy dog.", "Token shards store integers.",
            "Paris is the capital of France."]

    def stream_of(texts):
        out = []
        for d in texts:
            out += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + \
                [tok.eos_token_id]
        return out

    stream = stream_of(docs)
    while not [m for m in range(5, len(stream) // 2 + 1) if len(stream) % m == 0]:
        docs.append("fox.")                  # until the length has a divisor to test with
        stream = stream_of(docs)
    max_length = max(m for m in range(5, len(stream) // 2 + 1) if len(stream) % m == 0)
    code, out, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                             write_plugin(docs), "--encode_type", "pretrain",
                             "--max_length", str(max_length))
    assert code == 0, err
    samples = read_samples(tmp_path / "out" / "c")
    assert all(len(ids) == max_length for ids, _, _ in samples)
    assert sum((ids for ids, _, _ in samples), []) == stream
    assert all(all(mask) for _, mask, _ in samples)
    assert "final remainder" not in out


def test_analyze_writes_nothing(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    code, out, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                             write_plugin(QA_ROWS), "--encode_type", "qa", "--max_length", "16",
                             "--analyze")
    assert code == 0, err
    assert "document length" in out and "dropped" in out
    assert not (tmp_path / "out").exists()


def test_truncation_counts(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    rows = [{"q": "What is the capital of France? " * 6, "a": "Paris."}] + QA_ROWS
    base = ("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path", write_plugin(rows),
            "--encode_type", "qa", "--max_length", "24")
    assert run_cli(*base)[0] == 0
    stats = json.loads((tmp_path / "out" / "c" / "stats.json").read_text())
    assert stats["dropped"] == 1 and stats["samples"] == 3
    assert run_cli(*base, "--truncation", "prompt_left", "--overwrite")[0] == 0
    stats = json.loads((tmp_path / "out" / "c" / "stats.json").read_text())
    assert stats["truncated"] == 1 and stats["dropped"] == 0 and stats["samples"] == 4
    ids, mask, _ = read_samples(tmp_path / "out" / "c")[0]
    assert len(ids) == 24 and ids[0] == 1 and ids[-1] == 2 and mask[-1]


def test_merge_data_and_workers_byte_identical(run_cli, write_plugin, hermetic_tokenizer_dir,
                                               tmp_path, monkeypatch):
    import encoder.pipeline as pipeline
    monkeypatch.setattr(pipeline, "BATCH_ROWS", 7)        # many batches -> ordering matters
    rows = [{"q": f"Question {i}: what is the capital of France?" + " fox" * (i % 11),
             "a": "Paris is the capital." + " dog" * (i % 5)} for i in range(120)]
    plugin = write_plugin(rows)
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        code, _, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                               plugin, "--encode_type", "qa", "--max_length", "256",
                               "--merge_data", "--num_workers", workers, out=out)
        assert code == 0, err
        outs.append(out / "c")
    for name in ("c_00000.bin", "c_00000.idx", "stats.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    m0, m1 = (json.loads((o / "manifest.json").read_text()) for o in outs)
    m0.pop("created_unix"), m1.pop("created_unix")
    assert m0 == m1
    samples = read_samples(outs[0])
    assert sum(len(d) for _, _, d in samples) == 120          # every doc packed exactly once
    assert all(len(ids) <= 256 for ids, _, _ in samples)
    assert m0["packing"] == "bfd"


def test_template_generator_makes_every_combination(write_plugin):
    from encoder.plugins import load_plugin, raw_rows
    plugin = load_plugin(str(PLUGINS / "template_generator.py"))
    rows = [r for _, r in raw_rows(plugin, {})]
    assert len(rows) == 12 == len({(r["q"], r["a"]) for r in rows})
    assert rows[0]["q"] == "Write a short email to Alice about the quarterly report."
    assert "Dear Alice," in rows[0]["a"] and "{{" not in rows[0]["a"]


def test_example_plugins_yield_valid_rows():
    from encoder.plugins import check_row, load_plugin, raw_rows
    for name, kind in [("alpaca.py", "qa"), ("sharegpt.py", "chat"), ("text.py", "pretrain"),
                       ("template_generator.py", "qa")]:
        rows = [r for _, r in raw_rows(load_plugin(str(PLUGINS / name)), {})]
        assert rows and all(check_row(r, encode_type=kind) for r in rows), name


def test_part_slices_join_to_the_full_run(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(7)]
    plugins = {"plain": write_plugin(rows)}
    plugins["alpaca"] = str(PLUGINS / "alpaca.py")
    for label, plugin in plugins.items():
        base = ("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path", plugin,
                "--encode_type", "qa", "--max_length", "128")
        assert run_cli(*base, out=tmp_path / label / "full")[0] == 0
        joined = []
        for i in range(3):
            assert run_cli(*base, "--part", f"{i}/3", out=tmp_path / label / f"p{i}")[0] == 0
            joined += read_samples(tmp_path / label / f"p{i}" / "c")
        assert joined == read_samples(tmp_path / label / "full" / "c"), label


def test_add_tokens_saved_and_listed(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello there."}]}]
    code, _, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                           write_plugin(rows), "--encode_type", "chat", "--template", "chatml",
                           "--add_tokens", "<|im_start|>", "<|im_end|>", "--max_length", "64")
    assert code == 0, err
    ds = open_dataset(str(tmp_path / "out" / "c"))
    added = ds.manifests[0]["metadata"]["added_tokens"]
    assert set(added) == {"<|im_start|>", "<|im_end|>"}
    assert ds.manifests[0]["tokenizer"]["len"] == max(added.values()) + 1
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "c" / "tokenizer"))
    assert saved.convert_tokens_to_ids("<|im_end|>") == added["<|im_end|>"]
    ids, mask = ds[0].input_ids.tolist(), ds[0].loss_mask.tolist()
    assert ids[-1] == added["<|im_end|>"] and mask[-1]


def test_plot_writes_png(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    code, _, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                           write_plugin(QA_ROWS), "--encode_type", "qa", "--max_length", "64",
                           "--plot")
    assert code == 0, err
    assert (tmp_path / "out" / "c" / "lengths.png").read_bytes()[:4] == b"\x89PNG"


# -- real tokenizers / data -------------------------------------------------------------------------
def test_int16_with_qwen3_fails_before_tokenizing(run_cli, write_plugin):
    tok = shared_tokenizer_path("qwen3")
    plugin = write_plugin(code="def data_loader():\n    raise RuntimeError('rows were read')\n"
                               "    yield\n")
    code, _, err = run_cli("--tokenizer_path", tok, "--data_loader_path", plugin, "--encode_type",
                           "qa", "--max_length", "64", "--save_dtype", "int16")
    assert code == 2
    assert "151669 tokens" in err and "--save_dtype int32" in err and "rows were read" not in err


def test_gpt2_auto_dtype_uint16_and_packing_fill_on_alpaca(run_cli, tmp_path):
    tok = shared_tokenizer_path("gpt2")
    data = ",".join(shared_data(f"alpaca_{lang}_demo.json") for lang in ("en", "zh"))
    code, _, err = run_cli("--tokenizer_path", tok, "--data_loader_path",
                           str(PLUGINS / "alpaca.py"), "--data_loader_args", f"path={data}",
                           "--encode_type", "qa", "--template", "alpaca", "--max_length", "2048",
                           "--merge_data")
    assert code == 0, err
    ds = open_dataset(str(tmp_path / "out" / "c"))
    assert ds.dtype == "uint16"
    stats = ds.manifests[0]["metadata"]["stats"]
    assert stats["dropped"] == 0 and sum(len(ds[i].doc_lens) for i in range(len(ds))) == 1999
    assert stats["fill"] >= 0.995
    assert stats["samples"] == stats["min_possible_samples"]   # ceil(tokens / max_length)


def test_help_as_script():
    res = subprocess.run([sys.executable, str(REPO / "encoder" / "main.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for flag in ("--merge_data", "--save_dtype", "--truncation", "--pack_window", "--part",
                 "--skip_invalid", "--analyze", "--plot", "--add_tokens", "--template"):
        assert flag in res.stdout
