"""The light tokenizer loader (encoder/json_tokenizer.py) must be the transformers tokenizer in
every observable way the encoder uses, wherever `light_load_problem` lets it be used: same ids,
special tokens, policy, identity, and byte-identical datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from encoder_testlib import real_tokenizer, shared_data, shared_tokenizer_path
from encoder.json_tokenizer import JsonTokenizer, light_load_problem
from encoder.tokenizer_policy import load_encoding_tokenizer, measure_policy
from shardfmt import tokenizer_identity

SHARED_NAMES = ["llama2", "gpt2", "qwen3", "internlm", "llama3", "chinese-llama2-alpaca2"]
TEXTS = ["Hello world", " leading space", "  two\n\nlines\t tab", "", "a", "中文文本，还有标点。",
         "literal </s> and <|im_end|> and <s> in data", "emoji 😀 ÿ\u00a0nbsp\u200bzwsp",
         "Calculate 15% of 500.", "x" * 300]


def assert_same_tokenizer(light: JsonTokenizer, ref) -> None:
    """Every attribute and call of the encoder's non-chat path agrees with transformers."""
    for split in (False, True):
        for special in (False, True):
            assert light(TEXTS, add_special_tokens=special, split_special_tokens=split)[
                "input_ids"] == ref(TEXTS, add_special_tokens=special,
                                    split_special_tokens=split)["input_ids"], (split, special)
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(light, key) == (None if getattr(ref, key) is None
                                       else str(getattr(ref, key))), key
        assert getattr(light, key + "_id") == getattr(ref, key + "_id"), key
    assert len(light) == len(ref)
    assert light.get_added_vocab() == ref.get_added_vocab()
    assert measure_policy(light) == measure_policy(ref)
    ours, theirs = tokenizer_identity(light), tokenizer_identity(ref)
    ours.pop("class"), theirs.pop("class")          # informational; see JsonTokenizer.class_name
    assert ours == theirs


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_light_loader_equals_transformers_on_real_tokenizers(name):
    path = shared_tokenizer_path(name)
    assert light_load_problem(path) is None
    light = load_encoding_tokenizer(path)
    assert isinstance(light, JsonTokenizer)
    assert_same_tokenizer(light, real_tokenizer(name))
    assert light.class_name == type(real_tokenizer(name)).__name__


def variant_dir(tmp_path: Path, name: str, config_update: dict, *, extra_files: dict | None = None
                ) -> str:
    src = Path(shared_tokenizer_path(name))
    out = tmp_path / f"{name}_variant"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(config_update)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    for fname, content in (extra_files or {}).items():
        (out / fname).write_text(json.dumps(content))
    return str(out)


# Config keys that make transformers change the pipeline or the special tokens, and harmless ones.
VARIANTS = [
    ("llama2", {"legacy": True}, None),
    ("llama2", {"legacy": False}, None),
    ("llama2", {"add_prefix_space": False}, None),
    ("llama2", {"add_prefix_space": True}, None),
    ("llama2", {"add_bos_token": False, "add_eos_token": True}, None),
    ("llama2", {"tokenizer_class": "LlamaTokenizerFast"}, None),
    ("llama2", {}, {"special_tokens_map.json": {"eos_token": "<unk>"}}),
    ("llama2", {}, {"special_tokens_map.json": {"eos_token": {"content": "</s>"}}}),
    ("internlm", {"add_prefix_space": True}, None),
    ("internlm", {"add_prefix_space": False}, None),
    ("gpt2", {"add_prefix_space": True}, None),
    ("gpt2", {"add_prefix_space": False}, None),
    ("qwen3", {"pad_token": "<|im_start|>"}, None),
    ("qwen3", {"eos_token": {"content": "<|endoftext|>", "__type": "AddedToken"}}, None),
]


@pytest.mark.parametrize("name,update,files", VARIANTS,
                         ids=[f"{n}-{json.dumps(u)[:40]}-{bool(f)}" for n, u, f in VARIANTS])
def test_light_loader_is_used_only_where_it_equals_transformers(tmp_path, name, update, files):
    """The rule that matters: whenever the light loader is chosen, it equals transformers.
    (If a transformers upgrade changes what these keys do, this fails and the rule needs updating.)"""
    from transformers import AutoTokenizer
    path = variant_dir(tmp_path, name, update, extra_files=files)
    ref = AutoTokenizer.from_pretrained(path)
    tok = load_encoding_tokenizer(path)
    if light_load_problem(path) is not None:
        assert not isinstance(tok, JsonTokenizer)
        return
    assert isinstance(tok, JsonTokenizer)
    assert_same_tokenizer(tok, ref)


def test_rules_that_force_transformers(tmp_path):
    llama_legacy = variant_dir(tmp_path, "llama2", {"legacy": True})
    assert "legacy" in light_load_problem(llama_legacy)
    t5 = variant_dir(tmp_path / "t5", "llama2", {"tokenizer_class": "T5Tokenizer"})
    assert "not one verified" in light_load_problem(t5)
    custom = variant_dir(tmp_path / "custom", "llama2", {"auto_map": {"AutoTokenizer": ["a.B", None]}})
    assert "auto_map" in light_load_problem(custom)
    qwen = shared_tokenizer_path("qwen3")
    assert "chat" in light_load_problem(qwen, needs_chat_template=True)
    assert "add_tokens" in light_load_problem(qwen, add_tokens=["<x>"])
    assert not isinstance(load_encoding_tokenizer(qwen, backend="transformers"), JsonTokenizer)
    with pytest.raises(ValueError, match="--tokenizer_backend"):
        load_encoding_tokenizer(qwen, backend="fast")


def test_hermetic_tokenizer_light_equals_transformers(hermetic_tokenizer_dir):
    from transformers import AutoTokenizer
    assert light_load_problem(hermetic_tokenizer_dir) is None
    assert_same_tokenizer(JsonTokenizer(hermetic_tokenizer_dir),
                          AutoTokenizer.from_pretrained(hermetic_tokenizer_dir))


def encode_both_ways(run_cli, tmp_path, *flags: str) -> list[Path]:
    outs = []
    for backend in ("auto", "transformers"):
        out = tmp_path / backend
        code, _, err = run_cli(*flags, "--tokenizer_backend", backend, out=out)
        assert code == 0, err
        outs.append(out / "c")
    return outs


def assert_same_dataset(outs: list[Path]) -> None:
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    for name in files:
        if name not in ("manifest.json", "stats.json"):
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    s0, s1 = (json.loads((o / "stats.json").read_text()) for o in outs)
    assert s0.pop("tokenizer_backend")["name"] != s1.pop("tokenizer_backend")["name"]
    assert s0 == s1
    m0, m1 = (json.loads((o / "manifest.json").read_text()) for o in outs)
    for m in (m0, m1):   # the engine that ran is recorded (gigatoken vs transformers)
        m["metadata"]["encoder"].pop("tokenizer_backend")
        m["metadata"]["stats"].pop("tokenizer_backend")
    loaders = [m["metadata"]["encoder"].pop("tokenizer_loader") for m in (m0, m1)]
    assert loaders[0].startswith("tokenizers.Tokenizer") and loaders[1].startswith("transformers")
    for m in (m0, m1):
        m.pop("created_unix")
    assert m0 == m1


def test_datasets_byte_identical_hermetic(run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path):
    rows = [{"q": f"What is the capital of France? {i}", "a": "Paris </s> is the capital." * (i % 3 + 1)}
            for i in range(40)]
    outs = encode_both_ways(run_cli, tmp_path, "--tokenizer_path", hermetic_tokenizer_dir,
                            "--data_loader_path", write_plugin(rows), "--encode_type", "qa",
                            "--template", "alpaca", "--max_length", "128", "--merge_data")
    assert_same_dataset(outs)


@pytest.mark.parametrize("name,encode_type,template", [
    ("llama2", "qa", "alpaca"), ("qwen3", "qa", "chatml"), ("llama3", "pretrain", None),
    ("gpt2", "pretrain", None)])
def test_datasets_byte_identical_real(run_cli, tmp_path, name, encode_type, template):
    from encoder_testlib import PLUGINS
    if encode_type == "qa":
        plugin, data = PLUGINS / "alpaca.py", shared_data("alpaca_zh_demo.json")
    else:
        plugin, data = PLUGINS / "text.py", shared_data("tinyshakespeare.txt")
    flags = ["--tokenizer_path", shared_tokenizer_path(name), "--data_loader_path", str(plugin),
             "--data_loader_args", f"path={data}", "--encode_type", encode_type,
             "--max_length", "512"] + (["--template", template, "--merge_data"] if template else [])
    assert_same_dataset(encode_both_ways(run_cli, tmp_path, *flags))


def test_cli_uses_transformers_for_chat_template(run_cli, write_plugin, tmp_path):
    path = shared_tokenizer_path("qwen3")
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    code, _, err = run_cli("--tokenizer_path", path, "--data_loader_path", write_plugin(rows),
                           "--encode_type", "chat", "--max_length", "64")
    assert code == 0, err
    assert "setup" in err and "transformers" in err.split("setup", 1)[1].splitlines()[0]

