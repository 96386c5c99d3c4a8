"""`--encode_type kto` (unpaired feedback): each example equals what qa/chat encoding gives its
conversation (completion-only loss), its boolean label is stored per segment and survives packing
and merging, truncation is counted, bad rows are named, and LLaMA-Factory's kto_en_demo.json
encodes through the bundled plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from encoder.main import main as encode_main
from encoder_testlib import PLUGINS, shared_data, shared_tokenizer_path
from shardfmt import open_dataset
from shardfmt.preference import is_kto, read_examples, segment_desirable
from shardfmt.verify import verify_dataset
from test_preference import _plugin, _sft_encoding

ROWS = [
    {"prompt": "What is the capital of France?", "completion": "Paris.", "label": True},
    {"prompt": "Write to Alice.", "system": "Be brief.", "completion": "Dear Bob, hi.",
     "label": False},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "The fox."}], "label": False},
    {"messages": [{"role": "user", "content": "Capital of France?"}],
     "completion": {"role": "assistant", "content": "Paris is the capital of France."},
     "label": True},
]


def _conversation(row: dict) -> list[dict]:
    if "prompt" in row:
        sys_ = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return sys_ + [{"role": "user", "content": row["prompt"]},
                       {"role": "assistant", "content": row["completion"]}]
    return row["messages"] + ([row["completion"]] if "completion" in row else [])


def _encode(tmp_path, tok_dir, rows, *extra, name="kto", max_length=256, template="alpaca"):
    plugin, arg = _plugin(tmp_path, rows)
    rc = encode_main(["--tokenizer_path", tok_dir, "--data_loader_path", plugin,
                      "--data_loader_args", arg, "--encode_type", "kto", "--template", template,
                      "--output_path", str(tmp_path / "out"), "--corpus_name", name,
                      "--max_length", str(max_length), *extra])
    assert rc == 0
    return tmp_path / "out" / name


def _all(ds) -> list[tuple]:
    return [(e.sample.input_ids.tolist(), e.sample.loss_mask.tolist(), e.desirable)
            for i in range(len(ds)) for e in read_examples(ds, i)]


@pytest.mark.parametrize("template", ["alpaca", "none"])
def test_each_example_is_the_chat_encoding_with_its_label(tmp_path, hermetic_tokenizer_dir,
                                                          template):
    ds = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, ROWS, template=template))
    assert is_kto(ds.manifest) and ds.manifest["format_version"] == 1
    assert ds.manifest["kto"] == {"layout": "unpaired",
                                  "label": "doc_flags bit 1 set = undesirable",
                                  "sequence_max_length": 256, "examples": 4, "desirable": 2,
                                  "undesirable": 2}
    assert verify_dataset(ds) == [] and len(ds) == 4
    for i, row in enumerate(ROWS):
        (ex,) = read_examples(ds, i)
        ids, mask = _sft_encoding(hermetic_tokenizer_dir, template, _conversation(row), 1)
        assert ex.sample.input_ids.tolist() == ids and ex.sample.loss_mask.tolist() == mask.tolist()
        assert ex.desirable is row["label"]
        assert not ds.doc_continues(i).any()       # bit 1 does not leak into bit 0


def test_merge_data_packs_whole_examples_labels_follow(tmp_path, hermetic_tokenizer_dir):
    rows = [dict(r, prompt=r["prompt"] + f" #{k}") if "prompt" in r else r
            for k in range(6) for r in ROWS]
    plain = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, rows, name="plain"))
    packed = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, rows, "--merge_data",
                                  name="packed"))
    assert len(packed) < len(plain) == 24 and packed.manifest["packing"] == "bfd"
    assert sorted(_all(packed)) == sorted(_all(plain))
    assert sum(segment_desirable(packed, i).sum() for i in range(len(packed))) == 12


def test_truncation_counted(tmp_path, hermetic_tokenizer_dir):
    long = {"prompt": "What is the capital of France? " * 6, "completion": "Paris.",
            "label": True}
    ds = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, [ROWS[0], long], name="drop",
                              max_length=30, template="none"))
    assert len(ds) == 1 and ds.manifest["metadata"]["stats"]["dropped"] == 1
    ds = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, [ROWS[0], long], "--truncation",
                              "prompt_left", name="left", max_length=30, template="none"))
    stats = ds.manifest["metadata"]["stats"]
    assert stats["truncated"] == 1 and stats["dropped"] == 0 and len(ds) == 2
    assert len(ds[1].input_ids) == 30 and read_examples(ds, 1)[0].desirable


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "completion": "A"}, "lacks 'label'"),
    ({"prompt": "Q", "completion": "A", "label": 1}, "'label' must be a boolean"),
    ({"prompt": "Q", "completion": "A", "label": "true"}, "got str 'true'"),
    ({"prompt": "Q", "label": True}, "lacks 'completion'"),
    ({"messages": [{"role": "user", "content": "Q"}], "label": True},
     "must end with the assistant completion"),
])
def test_bad_rows_are_named(tmp_path, hermetic_tokenizer_dir, capsys, row, message):
    plugin, arg = _plugin(tmp_path, [ROWS[0], row])
    rc = encode_main(["--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path", plugin,
                      "--data_loader_args", arg, "--encode_type", "kto", "--template", "none",
                      "--output_path", str(tmp_path / "o"), "--corpus_name", "c",
                      "--max_length", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "row 1" in err and message in err, err
    assert not (tmp_path / "o" / "c" / "manifest.json").exists()


def test_demo_plugin_names_file_and_record_of_a_bad_label(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("kto_messages", PLUGINS / "kto_messages.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    data = tmp_path / "fb.json"
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "label": True}
    data.write_text(json.dumps([good, dict(good, label="yes")]))
    with pytest.raises(ValueError, match=r"fb.json: record 1: 'label' must be a JSON boolean"):
        list(plugin.data_loader(str(data)))


def test_llama_factory_kto_demo(tmp_path):
    """kto_en_demo.json (300 rows, 150 desirable) through the bundled plugin, qwen3's chat
    template: every kept example's label and completion are its record's."""
    path = shared_data("kto_en_demo.json")
    tok_dir = shared_tokenizer_path("qwen3")
    rc = encode_main(["--tokenizer_path", tok_dir, "--data_loader_path",
                      str(PLUGINS / "kto_messages.py"), "--data_loader_args", f"path={path}",
                      "--encode_type", "kto", "--output_path", str(tmp_path),
                      "--corpus_name", "d", "--max_length", "4096", "--merge_data"])
    assert rc == 0
    ds = open_dataset(tmp_path / "d")
    stats, kto = ds.manifest["metadata"]["stats"], ds.manifest["kto"]
    assert stats["rows"] == 300 and kto["examples"] + stats["dropped"] == 300
    assert verify_dataset(ds) == []
    records = json.loads(Path(path).read_text())
    by_answer = {r["messages"][-1]["content"].strip(): r["label"] for r in records}
    assert stats["dropped"] == 0 and kto["desirable"] == sum(r["label"] for r in records) == 150
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    examples = [e for i in range(len(ds)) for e in read_examples(ds, i)]
    assert len(examples) == kto["examples"]
    for e in examples[:40]:
        text = tok.decode(e.sample.input_ids[e.sample.loss_mask]).replace("<|im_end|>", "")
        answer = text.split("</think>")[-1].strip()   # Qwen3 trains "\n</think>\n\n" as chat does
        assert by_answer[answer] is e.desirable
        # one trained run: earlier assistant turns of multi-turn records are prompt
        edges = np.flatnonzero(np.diff(np.r_[0, e.sample.loss_mask.astype(np.int8), 0]))
        assert len(edges) == 2


def test_parts_merge_into_one_kto_dataset(tmp_path, hermetic_tokenizer_dir):
    """--part 0/2 and 1/2 merged: same examples and labels as one encode, label counts summed."""
    from shardfmt.merge import merge_datasets
    rows = [dict(ROWS[k % 2], prompt=f"Question {k}?") for k in range(6)]
    whole = open_dataset(_encode(tmp_path, hermetic_tokenizer_dir, rows, name="whole"))
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
    parts = [_encode(tmp_path / f"p{i}", hermetic_tokenizer_dir, rows, "--part", f"{i}/2",
                     name="c") for i in range(2)]
    merged = open_dataset(merge_datasets(parts, tmp_path / "merged" / "c"))
    assert merged.manifest["kto"]["undesirable"] == 3 == whole.manifest["kto"]["undesirable"]
    assert _all(merged) == _all(whole) and verify_dataset(merged) == []


def test_writer_refuses_unknown_flag_bits(tmp_path):
    from shardfmt import ShardWriter
    with ShardWriter(tmp_path, "w", dtype="uint16", encode_type="kto", max_length=8,
                     tokenizer_info={}, overwrite=True) as w:
        with pytest.raises(ValueError, match="doc_flags"):
            w.add_sample([(np.array([1, 2]), np.array([0, 1]))], doc_flags=[4])
        w.add_sample([(np.array([1, 2]), np.array([0, 1]))], doc_flags=[2])
        w.manifest_extra["kto"] = {"layout": "unpaired", "undesirable": 1}
    ds = open_dataset(tmp_path / "w")
    assert segment_desirable(ds, 0).tolist() == [False] and verify_dataset(ds) == []


def test_megatron_export_refuses_labelled_examples(tmp_path, hermetic_tokenizer_dir, capsys):
    """Megatron's format has no label field: exporting a KTO dataset exits 2 naming it; nothing
    is written."""
    from shardfmt.__main__ import main as shardfmt_main
    out = _encode(tmp_path, hermetic_tokenizer_dir, ROWS)
    assert shardfmt_main(["export-megatron", str(out), str(tmp_path / "mega" / "x")]) == 2
    assert f"{out}: holds KTO examples labelled desirable/undesirable" in capsys.readouterr().err
    assert not (tmp_path / "mega").exists() or not any((tmp_path / "mega").iterdir())
