"""`python -m encoder.tokenizer train|extend`: trained tokenizers load with AutoTokenizer and the
encoder; extension keeps every base id (llama2 SentencePiece merge, gpt2 byte-level merges)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from encoder.tokenizer import main as tool_main

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "tokenizers" / "llama2").is_dir(),
                                  reason="../shared (real tokenizers and data) is absent")
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@pytest.fixture(scope="module")
def mixed_plugin(tmp_path_factory) -> Path:
    """Rows of all three kinds; 'zulugram' occurs only in chat contents, 'qanswerword' only in qa
    answers, so the tokenizer must read every kind of row."""
    p = tmp_path_factory.mktemp("plugin") / "mixed.py"
    p.write_text(f"""
WORDS = {WORDS!r}
def data_loader(n="600"):
    for i in range(int(n)):
        w = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6))
        if i % 3 == 0:
            yield w + " plain text " + str(i)
        elif i % 3 == 1:
            yield {{"q": "say " + w, "a": "qanswerword " + w}}
        else:
            yield {{"messages": [{{"role": "user", "content": w}},
                                 {{"role": "assistant", "content": "zulugram " + w}}]}}
""")
    return p


def _train(plugin: Path, out: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "encoder.tokenizer", "train", "--data_loader_path",
                           str(plugin), "--vocab_size", "400", "--output", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("kind", [["--model", "bpe"], ["--model", "bpe", "--sentencepiece"],
                                  ["--model", "unigram"]], ids=["bytelevel", "sp_bpe", "unigram"])
def test_train_loads_in_autotokenizer_and_encoder(tmp_path, mixed_plugin, kind):
    from transformers import AutoTokenizer
    out = tmp_path / "tok"
    stdout = _train(mixed_plugin, out, *kind, "--chat_template", "chatml", "--special_tokens", "<x>")
    m = re.search(r"held-out slice \(every 100th row, (\d+) texts\): ([\d.]+) tokens/char, "
                  r"([\d.]+) bytes/token", stdout)
    assert m and int(m[1]) > 0 and 0 < float(m[2]) < 1 and float(m[3]) > 1, stdout
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 400 or (len(tok) < 400 and "no more pairs" in stdout)  # 8-word corpus
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    for special in ("<|im_start|>", "<|im_end|>", "<x>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    text = "zulugram qanswerword alpha, 孙悟空!\n  x"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS added, like Llama
    assert tok.decode(ids, skip_special_tokens=True) == text  # lossless (byte level / fallback)
    pieces = tok.tokenize(" zulugram qanswerword")
    assert not any(p.startswith("<0x") for p in pieces), pieces  # chat/qa text was trained on
    if kind[-1] != "unigram":  # BPE: frequent words become tokens
        assert len(tok.tokenize(" zulugram")) <= 2 and len(tok.tokenize(" qanswerword")) <= 2
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>user\nhi<|im_end|>")
    if "--model" in kind and kind[-1] != "bpe":  # SentencePiece-compatible: a .model as well
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        assert sp.get_piece_size() == len(tok)
        assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
        assert sp.piece_to_id("<0x00>") == 7 and sp.decode(sp.encode(text)) == text
    # the encoder uses it as is
    from encoder.main import main as encode_main
    assert encode_main(["--tokenizer_path", str(out), "--data_loader_path", str(mixed_plugin),
                        "--data_loader_args", "n=30", "--encode_type", "pretrain",
                        "--corpus_name", "c", "--output_path", str(tmp_path / "enc"),
                        "--max_length", "64"]) == 2  # mixed rows are not all pretrain strings
    plain = tmp_path / "plain.py"
    plain.write_text("def data_loader():\n    yield from ['alpha bravo zulugram'] * 20\n")
    assert encode_main(["--tokenizer_path", str(out), "--data_loader_path", str(plain),
                        "--encode_type", "pretrain", "--corpus_name", "c",
                        "--output_path", str(tmp_path / "enc2"), "--max_length", "64"]) == 0
    manifest = json.loads((tmp_path / "enc2" / "c" / "manifest.json").read_text())
    assert manifest["tokenizer"]["len"] == len(tok)


def test_bad_input_is_one_line_exit_2(tmp_path, mixed_plugin, capsys):
    assert tool_main(["extend", "--base", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "either --data_loader_path" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert tool_main(["train", "--data_loader_path", str(mixed_plugin), "--vocab_size", "300",
                      "--output", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text("def data_loader():\n    yield 'ok'\n    yield 3\n")
    assert tool_main(["train", "--data_loader_path", str(bad), "--vocab_size", "300",
                      "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "bad.py: row 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


def _vocab(path: Path) -> dict:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path).get_vocab()


@needs_shared
def test_extend_llama2_on_xiyouji(tmp_path):
    """The Chinese-LLaMA recipe: >= 30% fewer tokens on held-out Chinese; base ids kept; the
    SentencePiece .model is the base's pieces followed by the new ones (score 0)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer
    base, out = SHARED / "tokenizers" / "llama2", tmp_path / "zh"
    proc = subprocess.run([sys.executable, "-m", "encoder.tokenizer", "extend", "--base", str(base),
                           "--data_loader_path", "encoder/user_data_loader/text.py",
                           "--data_loader_args", f"path={SHARED / 'data' / 'zh_xiyouji.txt'}",
                           "split=line", "--vocab_size", "8000", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: all 32000 base tokens keep their ids" in proc.stdout
    before = float(re.search(r"before .*?: ([\d.]+) tokens/char", proc.stdout)[1])
    after = float(re.search(r"after .*?: ([\d.]+) tokens/char", proc.stdout)[1])
    assert after <= 0.7 * before, proc.stdout
    old, new = _vocab(base), _vocab(out)
    assert all(new[t] == i for t, i in old.items()) and len(new) > 32000 + 1000
    assert sorted(new.values()) == list(range(len(new)))  # no gaps
    tok = AutoTokenizer.from_pretrained(out)
    text = "却说那孙悟空保着唐僧西天取经。Hello world"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert len(tok(text)["input_ids"]) < len(AutoTokenizer.from_pretrained(base)(text)["input_ids"])
    proto, base_proto = pb.ModelProto(), pb.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    base_proto.ParseFromString((base / "tokenizer.model").read_bytes())
    assert [p.piece for p in proto.pieces[:32000]] == [p.piece for p in base_proto.pieces]
    assert len(proto.pieces) == len(new) and all(p.score == 0 for p in proto.pieces[32000:])
    assert [p.piece for p in proto.pieces[32000:]] == sorted(
        (t for t in new if new[t] >= 32000), key=new.get)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.decode(sp.encode(text)) == text


@needs_shared
def test_extend_gpt2_with_pieces_file(tmp_path):
    """Byte-level base + --pieces: each new word becomes one token through appended merges."""
    from transformers import AutoTokenizer
    base, out = SHARED / "tokenizers" / "gpt2", tmp_path / "g"
    pieces = tmp_path / "pieces.txt"
    pieces.write_text("孙\n悟\n空\n悟空\n孙悟空\n Zyxwvut\n")
    assert tool_main(["extend", "--base", str(base), "--pieces", str(pieces),
                      "--output", str(out)]) == 0
    old, new = _vocab(base), _vocab(out)
    assert all(new[t] == i for t, i in old.items())
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok.tokenize("孙悟空")) == 1 and len(tok.tokenize(" Zyxwvut")) == 1
    assert tok.decode(tok("孙悟空 Zyxwvut")["input_ids"]) == "孙悟空 Zyxwvut"
