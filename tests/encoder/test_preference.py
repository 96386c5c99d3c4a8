"""`--encode_type preference`: each side equals what qa/chat encoding gives that conversation
(response-only loss), pairs truncate/drop as a unit and are counted, --merge_data packs whole pairs,
the manifest records pairs, the LLaMA-Factory demo files encode through the bundled plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from encoder.main import main as encode_main
from encoder.document_encoder import DocumentEncoder, EncoderSpec
from encoder_testlib import PLUGINS, shared_data, shared_tokenizer_path
from shardfmt import open_dataset
from shardfmt.preference import is_preference, pair_counts, read_pairs

ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
    {"prompt": "Write to Alice.", "system": "Be brief.", "chosen": "Dear Alice, hi.",
     "rejected": "Dear Bob, hi."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Capital of France?"}],
     "chosen": {"role": "assistant", "content": "Paris is the capital of France."},
     "rejected": [{"role": "assistant", "content": "The fox."}]},
]


def _plugin(tmp_path: Path, rows: list) -> str:
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    plugin = tmp_path / "plugin.py"
    plugin.write_text("import json\n\ndef data_loader(path):\n"
                      "    yield from json.load(open(path))\n")
    return str(plugin), f"path={data}"


def _encode(tmp_path, tok_dir, rows, *extra, name="pairs", max_length=256, template="alpaca"):
    plugin, arg = _plugin(tmp_path, rows)
    rc = encode_main(["--tokenizer_path", tok_dir, "--data_loader_path", plugin,
                      "--data_loader_args", arg, "--encode_type", "preference",
                      "--template", template, "--output_path", str(tmp_path / "out"),
                      "--corpus_name", name, "--max_length", str(max_length), *extra])
    assert rc == 0
    return tmp_path / "out" / name


def _sft_encoding(tok_dir: str, template: str, messages: list[dict], responses: int):
    enc = DocumentEncoder(EncoderSpec(tok_dir, "chat", 10_000, template=template))
    e = enc.encode_rows([messages])[0]
    mask = e.mask.copy()
    # only the last `responses` assistant turns: the earlier ones are prompt
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    mask[:edges[0::2][-responses]] = False
    return e.ids.tolist(), mask


def _conversation(row: dict, side: str) -> list[dict]:
    if "prompt" in row:
        sys_ = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return sys_ + [{"role": "user", "content": row["prompt"]},
                       {"role": "assistant", "content": row[side]}]
    resp = row[side] if isinstance(row[side], list) else [row[side]]
    return row["messages"] + resp


@pytest.mark.parametrize("template", ["alpaca", "none"])
def test_each_side_is_the_qa_chat_encoding(tmp_path, hermetic_tokenizer_dir, template):
    out = _encode(tmp_path, hermetic_tokenizer_dir, ROWS, template=template)
    ds = open_dataset(out)
    assert is_preference(ds.manifest)
    pref = ds.manifest["preference"]
    assert pref["order"] == ["chosen", "rejected"] and pref["pairs"] == 3
    assert pref["sequence_max_length"] == 256 and ds.manifest["max_length"] == 512
    assert len(ds) == 3
    for i, row in enumerate(ROWS):
        (pair,) = read_pairs(ds, i)
        for side, got in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            ids, mask = _sft_encoding(hermetic_tokenizer_dir, template, _conversation(row, side), 1)
            assert got.input_ids.tolist() == ids
            assert got.loss_mask.tolist() == mask.tolist()
        # the prompt (everything before the first trained token) is shared
        c0 = int(np.argmax(pair.chosen.loss_mask))
        assert c0 == int(np.argmax(pair.rejected.loss_mask))
        assert pair.chosen.input_ids[:c0].tolist() == pair.rejected.input_ids[:c0].tolist()


def test_chat_template_real_tokenizer_multi_turn(tmp_path):
    tok_dir = shared_tokenizer_path("qwen3")
    out = _encode(tmp_path, tok_dir, ROWS[2:], template="chat", max_length=256)
    (pair,) = read_pairs(open_dataset(out), 0)
    ids, mask = _sft_encoding(tok_dir, "chat", _conversation(ROWS[2], "chosen"), 1)
    assert pair.chosen.input_ids.tolist() == ids and pair.chosen.loss_mask.tolist() == mask.tolist()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    trained = tok.decode(pair.chosen.input_ids[pair.chosen.loss_mask])
    assert "Paris is the capital of France." in trained and "Hello!" not in trained
    assert trained.endswith("<|im_end|>")


def test_truncation_is_per_pair_and_counted(tmp_path, hermetic_tokenizer_dir):
    long = {"prompt": "What is the capital of France? " * 6, "chosen": "Paris.",
            "rejected": "It is Lyon, I am quite sure about that, Lyon. " * 3}
    rows = [ROWS[0], long]
    out = _encode(tmp_path, hermetic_tokenizer_dir, rows, name="drop", max_length=40,
                  template="none")
    ds = open_dataset(out)
    assert len(ds) == 1 and ds.manifest["metadata"]["stats"]["dropped"] == 1
    # prompt_left: both prompts lose the same tokens, so they stay identical
    rows = [{"prompt": "What is the capital of France? " * 6, "chosen": "Paris.",
             "rejected": "Lyon, I think so."}]
    out = _encode(tmp_path, hermetic_tokenizer_dir, rows, "--truncation", "prompt_left", "--template", "none",
                  name="left", max_length=40)
    ds = open_dataset(out)
    stats = ds.manifest["metadata"]["stats"]
    assert stats["truncated"] == 1 and stats["dropped"] == 0
    (pair,) = read_pairs(ds, 0)
    assert max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) == 40
    c0 = int(np.argmax(pair.chosen.loss_mask))
    assert pair.chosen.input_ids[:c0].tolist() == pair.rejected.input_ids[:c0].tolist()


def test_merge_data_packs_whole_pairs(tmp_path, hermetic_tokenizer_dir):
    rows = [dict(r, prompt=r.get("prompt", "") + f" #{k}") if "prompt" in r else r
            for k in range(8) for r in ROWS]
    plain = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, rows, name="plain"))
    packed = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, rows, "--merge_data",
                                  name="packed"))
    assert len(packed) < len(plain) and packed.manifest["packing"] == "bfd"
    assert int(pair_counts(packed).sum()) == len(plain) == 24

    def as_set(ds):
        return sorted((p.chosen.input_ids.tolist(), p.chosen.loss_mask.tolist(),
                       p.rejected.input_ids.tolist(), p.rejected.loss_mask.tolist())
                      for i in range(len(ds)) for p in read_pairs(ds, i))
    assert as_set(packed) == as_set(plain)
    for s in packed:
        assert len(s.input_ids) <= 512 and len(s.doc_lens) % 2 == 0


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "A"}, "lacks ['rejected']"),
    ({"q": "Q", "a": "A"}, "lacks ['prompt', 'chosen', 'rejected']"),
    ({"prompt": "Q", "chosen": "A", "rejected": ""}, "'rejected' conversation: assistant message"),
    ({"messages": [{"role": "user", "content": "Q"}], "chosen": 3, "rejected": "B"},
     "'chosen' must be a str"),
])
def test_bad_rows_are_named(tmp_path, hermetic_tokenizer_dir, capsys, row, message):
    plugin, arg = _plugin(tmp_path, [ROWS[0], row])
    rc = encode_main(["--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path", plugin,
                      "--data_loader_args", arg, "--encode_type", "preference", "--template",
                      "none", "--output_path", str(tmp_path / "o"), "--corpus_name", "c",
                      "--max_length", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "row 1" in err and message in err, err


@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json"])
def test_llama_factory_demo_files(tmp_path, name):
    path = shared_data(name)
    tok_dir = shared_tokenizer_path("qwen3")
    rc = encode_main(["--tokenizer_path", tok_dir, "--data_loader_path",
                      str(PLUGINS / "dpo_sharegpt.py"), "--data_loader_args", f"path={path}",
                      "--encode_type", "preference", "--output_path", str(tmp_path),
                      "--corpus_name", "d", "--max_length", "4096", "--merge_data"])
    assert rc == 0
    ds = open_dataset(tmp_path / "d")
    stats = ds.manifest["metadata"]["stats"]
    assert stats["rows"] == 300 and int(pair_counts(ds).sum()) + stats["dropped"] == 300
    from shardfmt.verify import verify_dataset
    assert verify_dataset(ds) == []
    rows = json.loads(Path(path).read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    pairs = [p for i in range(len(ds)) for p in read_pairs(ds, i)]
    chosen_texts = {r["chosen"]["value"].strip() for r in rows}
    for p in pairs[:20]:
        resp = tok.decode(p.chosen.input_ids[p.chosen.loss_mask]).replace("<|im_end|>", "")
        # Qwen3's template puts "\n</think>\n\n" after the generation prompt: trained, as in chat
        assert resp.split("</think>")[-1].strip() in chosen_texts


def _dpo_plugin():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpo_sharegpt", PLUGINS / "dpo_sharegpt.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    return plugin


DPO_GOOD = {"conversations": [{"from": "human", "value": "Q?"}],
            "chosen": {"from": "gpt", "value": "A."}, "rejected": {"from": "gpt", "value": "B."}}


@pytest.mark.parametrize("bad, message", [
    ({k: v for k, v in DPO_GOOD.items() if k != "rejected"}, "missing 'rejected'"),
    (dict(DPO_GOOD, chosen=None), "missing 'chosen'"),
    ({"chosen": DPO_GOOD["chosen"], "rejected": DPO_GOOD["rejected"]}, "missing 'conversations'"),
    (dict(DPO_GOOD, chosen=7), "'chosen' must be a message object"),
    (dict(DPO_GOOD, conversations=[{"from": "robot", "value": "x"}]),
     r"'conversations'\[0\]: unknown ShareGPT role 'robot'"),
    (dict(DPO_GOOD, conversations=["Q?"]), r"'conversations'\[0\] must be an object"),
    (["not", "a", "record"], "expected an object, got list"),
])
def test_dpo_plugin_names_file_and_record_of_a_bad_record(tmp_path, bad, message):
    """A bad record in a dpo file is refused by the bundled plugin naming the file and the
    record's index (of that file, also with several files); the parts are encoder.plugins'."""
    plugin = _dpo_plugin()
    first, second = tmp_path / "first.json", tmp_path / "pairs.json"
    first.write_text(json.dumps([DPO_GOOD] * 3))
    second.write_text(json.dumps([DPO_GOOD, DPO_GOOD, bad]))
    with pytest.raises(ValueError, match=rf"pairs.json: record 2: {message}"):
        list(plugin.data_loader(f"{first},{second}"))
    # the part holding the bad record names it the same way; the other part reads fine
    assert len(list(plugin.data_loader(f"{first},{second}", part=0, num_parts=2))) == 3
    with pytest.raises(ValueError, match=rf"pairs.json: record 2: {message}"):
        list(plugin.data_loader(f"{first},{second}", part=1, num_parts=2))


def test_dpo_plugin_error_reaches_the_user_with_file_and_record(tmp_path, hermetic_tokenizer_dir,
                                                                capsys):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([DPO_GOOD, {"conversations": DPO_GOOD["conversations"],
                                           "chosen": DPO_GOOD["chosen"]}]))
    rc = encode_main(["--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                      str(PLUGINS / "dpo_sharegpt.py"), "--data_loader_args", f"path={data}",
                      "--encode_type", "preference", "--template", "alpaca", "--output_path",
                      str(tmp_path / "o"), "--corpus_name", "c", "--max_length", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "pairs.json: record 1: missing 'rejected'" in err, err
    assert not (tmp_path / "o" / "c" / "manifest.json").exists()


def test_parts_merge_into_one_pair_dataset(tmp_path, hermetic_tokenizer_dir):
    """--part 0/2 and 1/2 merged (python -m shardfmt merge) read like one encode."""
    from shardfmt.merge import merge_datasets
    rows = [dict(ROWS[0], prompt=f"Question {k}?") for k in range(6)]
    whole = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, rows, name="whole"))
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
    parts = [_encode(tmp_path / f"p{i}", hermetic_tokenizer_dir, rows, "--part", f"{i}/2",
                     name="c") for i in range(2)]
    merged = open_dataset(merge_datasets(parts, tmp_path / "merged" / "c"))
    assert merged.manifest["preference"]["pairs"] == 6 == int(pair_counts(merged).sum())
    assert [s.input_ids.tolist() for s in merged] == [s.input_ids.tolist() for s in whole]


def test_megatron_export_refuses_pairs(tmp_path, hermetic_tokenizer_dir, capsys):
    """Megatron's format has no side field: `shardfmt export-megatron` of a pair dataset exits 2
    naming the dataset and what to do, and writes nothing (rejected answers never become text)."""
    from shardfmt.__main__ import main as shardfmt_main
    out = _encode(tmp_path, hermetic_tokenizer_dir, ROWS)
    assert shardfmt_main(["export-megatron", str(out), str(tmp_path / "mega" / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds preference pairs (chosen + rejected)" in err
    assert "--encode_type qa or chat" in err
    assert not (tmp_path / "mega").exists() or not any((tmp_path / "mega").iterdir())
