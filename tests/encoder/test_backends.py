"""--tokenizer_backend: auto's choice and its reasons, the sampled cross-check, the control-token
guard on every engine, and byte-identical shards for every engine on the real tokenizers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

import encoder.backends as backends
import encoder.main as encoder_main
from encoder.backends import CALIBRATION_TEXTS, Ragged
from encoder.document_encoder import DocumentEncoder, EncoderSpec, cross_check_sampled
from encoder_testlib import real_tokenizer, shared_data, shared_tokenizer_path

ENGINES = ("gigatoken", "tokenizers", "transformers")
# data text that spells control / special tokens of the tokenizers below
CONTROL_TEXTS = ["a literal </s> in html <s> and <unk>", "chatml <|im_end|> and <|im_start|>user",
                 "llama3 <|eot_id|><|begin_of_text|><|end_of_text|>", "gpt <|endoftext|> end",
                 "[INST] <<SYS>> fake [/INST]"]
# name -> (qa template, chat template) for the five tokenizers of ../shared/README.md's table
# with distinct BOS/EOS conventions (chinese-llama2-alpaca2 is llama2's pipeline + vocabulary)
TEMPLATES = {"llama2": ("alpaca", "llama2"), "gpt2": ("alpaca", "alpaca"),
             "qwen3": ("chatml", "chat"), "internlm": ("alpaca", "llama2"),
             "llama3": ("alpaca", "alpaca")}


# -- fixtures: tokenizers and gigatoken objects are loaded once per session ----------------------
_TOKS: dict = {}
_GIGA: dict = {}


@pytest.fixture
def cached_loads(monkeypatch):
    """main() loads its tokenizer (and gigatoken builds its own) once per session, not per run:
    the runs below differ only in the engine, which is what the test is about."""
    real_load = encoder_main.load_spec_tokenizer

    def load(spec):
        if spec.tokenizer_backend == "transformers" or (spec.encode_type != "pretrain"
                                                        and spec.template == "chat"):
            return real_tokenizer(Path(spec.tokenizer_path).name)   # AutoTokenizer, shared
        if spec.tokenizer_path not in _TOKS:
            _TOKS[spec.tokenizer_path] = real_load(spec)
        return _TOKS[spec.tokenizer_path]

    real_init = backends.GigatokenEncoder.__init__

    def init(self, tok, **kw):
        if id(tok) not in _GIGA:
            real_init(self, tok, **kw)
            _GIGA[id(tok)] = (tok, self._gt)
        else:
            self._gt, self._split_with = _GIGA[id(tok)][1], kw["split_with"]
            self.parallel = kw.get("parallel", True)

    monkeypatch.setattr(encoder_main, "load_spec_tokenizer", load)
    monkeypatch.setattr(backends.GigatokenEncoder, "__init__", init)


def data_rows(encode_type: str) -> list:
    """Real data from ../shared (English, Chinese, web text) plus rows spelling control tokens."""
    if encode_type == "pretrain":
        with open(shared_data("c4_demo.jsonl"), encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for _, line in zip(range(25), f)]
        with open(shared_data("zh_xiyouji.txt"), encoding="utf-8") as f:
            docs += [p for p in f.read(20000).split("\n") if p.strip()][:25]
        return docs + CONTROL_TEXTS + ["  spaces\t\ttabs\r\n", "😀👨\u200d👩\u200d👧 e\u0301"]
    with open(shared_data("alpaca_en_demo.json"), encoding="utf-8") as f:
        en = json.load(f)[:20]
    with open(shared_data("alpaca_zh_demo.json"), encoding="utf-8") as f:
        zh = json.load(f)[:20]
    qa = [{"q": (r["instruction"] + "\n" + r["input"]).strip(), "a": r["output"]} for r in en + zh]
    qa += [{"q": f"What does {t} mean?", "a": f"It is text: {t}"} for t in CONTROL_TEXTS]
    if encode_type == "qa":
        return qa
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": r["q"]},
                          {"role": "assistant", "content": r["a"]},
                          {"role": "user", "content": "And again?"},
                          {"role": "assistant", "content": r["a"][:40] or "ok"}]} for r in qa]


def encode(run_cli, write_plugin, out: Path, name: str, encode_type: str, *flags: str
           ) -> tuple[int, str, str]:
    template = () if encode_type == "pretrain" else \
        ("--template", TEMPLATES[name][0 if encode_type == "qa" else 1])
    return run_cli("--tokenizer_path", shared_tokenizer_path(name), "--data_loader_path",
                   write_plugin(data_rows(encode_type), name=f"{encode_type}_rows.py"),
                   "--encode_type", encode_type, "--max_length", "512", *template, *flags,
                   out=out)


# -- byte-identical shards -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_engine_writes_identical_shards(name, run_cli, write_plugin, tmp_path, cached_loads):
    for encode_type in ("pretrain", "qa", "chat"):
        merge = ("--merge_data",) if encode_type != "pretrain" else ()
        files = {}
        for engine in ENGINES:
            out = tmp_path / encode_type / engine
            code, _, err = encode(run_cli, write_plugin, out, name, encode_type, *merge,
                                  "--tokenizer_backend", engine, "--cross_check_every", "1")
            assert code == 0, err
            stats = json.loads((out / "c" / "stats.json").read_text())
            assert stats.pop("tokenizer_backend")["name"] == engine
            files[engine] = {p.name: p.read_bytes() for p in sorted((out / "c").iterdir())
                             if p.suffix in (".bin", ".idx")}
            files[engine]["stats"] = stats
        assert files["gigatoken"] == files["tokenizers"] == files["transformers"], \
            (name, encode_type)
        assert any(k.endswith(".bin") for k in files["gigatoken"])


# -- control-token text never becomes a control token, on every engine ---------------------------
_SPLIT_REFS: dict = {}


def split_reference(name: str):
    """A private transformers tokenizer of ../shared/tokenizers/NAME, called with
    split_special_tokens=True as the independent reference (private: that call leaves the
    backend's flag set, which must not leak into the shared `real_tokenizer`)."""
    if name not in _SPLIT_REFS:
        from transformers import AutoTokenizer
        _SPLIT_REFS[name] = AutoTokenizer.from_pretrained(shared_tokenizer_path(name))
    return _SPLIT_REFS[name]


@functools.lru_cache(maxsize=None)
def _added_tokens_json(name: str) -> tuple[dict, ...]:
    path = Path(shared_tokenizer_path(name)) / "tokenizer.json"
    return tuple(json.loads(path.read_text(encoding="utf-8"))["added_tokens"])


def added_tokens(name: str, *, special: bool) -> list[str]:
    """tokenizer.json's added tokens with "special": `special`, read from the file itself."""
    return [t["content"] for t in _added_tokens_json(name) if t["special"] is special]


def special_token_texts(name: str) -> list[str]:
    """Data texts spelling every special added token (alone, inside words, all run together),
    the non-special added ones (qwen3's <tool_call>, <think>: HF keeps them one token) and the
    usual control-token texts."""
    specials, plain = added_tokens(name, special=True), added_tokens(name, special=False)
    return ([f"say {s} now" for s in specials] + [f"x{s}y" for s in specials[:8]]
            + ["".join(specials), " ".join(specials + plain)]
            + [f"call {t} here" for t in plain] + CONTROL_TEXTS)


@pytest.mark.parametrize("name", ["qwen3", "llama2", "llama3"])
def test_special_token_text_stays_text_on_every_engine(name, cached_loads):
    """Every added token the tokenizer marks special, spelled in data, is encoded as plain text
    on every engine in pretrain, qa, chat, preference and kto: the ids equal HF's
    `tokenizer(text, split_special_tokens=True)` exactly; template markers stay control tokens
    (the chat run uses the named template: chatml's <|im_start|>/<|im_end|> for qwen3)."""
    from encoder.preference import PairRow, UnpairedRow
    from encoder.templates import render

    tok = real_tokenizer(name)
    ref = split_reference(name)

    def split(texts: list[str]) -> list[list[int]]:
        return ref(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    texts = special_token_texts(name)
    answers = texts[1:] + texts[:1]
    ref_t, ref_a, ref_r = split(texts), split(answers), split(answers[1:] + answers[:1])
    chats = [[{"role": "user", "content": t}, {"role": "assistant", "content": a}]
             for t, a in zip(texts, answers)]
    rejected = [[{"role": "user", "content": t}, {"role": "assistant", "content": a}]
                for t, a in zip(texts, answers[1:] + answers[:1])]
    plain_ids = {i for t in added_tokens(name, special=False)
                 for i in tok.convert_tokens_to_ids([t])}
    assert len(added_tokens(name, special=True)) == {"qwen3": 14, "llama2": 3, "llama3": 256}[name]

    def expected_rendered(enc, row) -> list[int]:   # segments encoded piece by piece, by HF
        ids = list(enc.prefix)
        for kind, value, _ in render(enc.template, row):
            ids += value if kind == "ids" else split([value])[0] if kind == "text" \
                else ref(value, add_special_tokens=False)["input_ids"]
        return ids

    results = {}
    for engine in ENGINES:
        def encoder(encode_type, template="none"):
            spec = EncoderSpec(shared_tokenizer_path(name), encode_type, 1 << 20,
                               template=template, tokenizer_backend=engine, cross_check_every=1)
            return DocumentEncoder(spec, tokenizer=tok)

        got = {}
        enc = encoder("pretrain")
        bos, eos = list(enc.prefix), enc.end_ids
        got["pretrain"] = enc.encode_rows(texts)
        assert [e.ids.tolist() for e in got["pretrain"]] == [bos + r + eos for r in ref_t]
        assert enc.engine.name == engine
        assert set(added_tokens(name, special=True)) <= set(
            tok.convert_ids_to_tokens(sorted(enc.control_ids)))
        assert not plain_ids & enc.control_ids   # <tool_call> & co. stay recognised
        enc = encoder("qa")
        got["qa"] = enc.encode_rows(chats)
        assert [e.ids.tolist() for e in got["qa"]] == [bos + t + a + eos
                                                       for t, a in zip(ref_t, ref_a)]
        enc = encoder("chat", TEMPLATES[name][0])
        got["chat"] = enc.encode_rows(chats)
        assert [e.ids.tolist() for e in got["chat"]] == [expected_rendered(enc, c) for c in chats]
        enc = encoder("preference")
        got["preference"] = enc.encode_rows(
            [PairRow(c, r, responses=(1, 1)) for c, r in zip(chats, rejected)])
        assert enc._pairs.inner.engine.name == engine
        assert [e.ids.tolist() for e in got["preference"]] == [
            bos + t + a + eos + bos + t + r + eos for t, a, r in zip(ref_t, ref_a, ref_r)]
        enc = encoder("kto")
        got["kto"] = enc.encode_rows([UnpairedRow(c, desirable=True, responses=1) for c in chats])
        assert [e.ids.tolist() for e in got["kto"]] == [bos + t + a + eos
                                                        for t, a in zip(ref_t, ref_a)]
        results[engine] = {k: [e.ids.tolist() for e in v] for k, v in got.items()}
    assert results["gigatoken"] == results["tokenizers"] == results["transformers"]


# -- auto: the choice and its reason ---------------------------------------------------------------
def test_auto_takes_gigatoken_and_says_why(run_cli, write_plugin, tmp_path, cached_loads):
    code, out, err = encode(run_cli, write_plugin, tmp_path / "o", "llama2", "pretrain")
    assert code == 0, err
    info = json.loads((tmp_path / "o" / "c" / "stats.json").read_text())["tokenizer_backend"]
    assert info["name"] == "gigatoken" and info["reference"] == "tokenizers"
    assert f"{len(CALIBRATION_TEXTS)} calibration strings" in info["reason"]
    assert "first batch" in info["reason"]
    assert "tokenizer backend gigatoken (ids equal to tokenizers" in out   # the summary line
    manifest = json.loads((tmp_path / "o" / "c" / "manifest.json").read_text())
    assert manifest["metadata"]["encoder"]["tokenizer_backend"]["name"] == "gigatoken"
    # start-up parts on the set-up line; the identity (computed after set-up) is in the manifest
    parts = next(line for line in err.splitlines() if line.startswith("setup "))
    for part in ("imports", "tokenizer load", "first batch read", "gigatoken build",
                 "calibration"):
        assert f"{part} " in parts, parts
    assert manifest["tokenizer"]["vocab_hash"] and manifest["tokenizer"]["len"] == 32000


def corrupt(marker: str):
    """A GigatokenEncoder.encode that gives a wrong id for any text containing `marker`."""
    real = backends.GigatokenEncoder.encode

    def encode(self, texts):
        r = real(self, texts)
        bad = [k for k, t in enumerate(texts) if marker in t and r.offsets[k + 1] > r.offsets[k]]
        if not bad:
            return r
        flat = r.flat.copy()
        flat[r.offsets[bad]] = (flat[r.offsets[bad]] + 1) % 1000
        return Ragged(flat, r.offsets)
    return encode


def test_auto_falls_back_when_first_batch_differs(run_cli, write_plugin, tmp_path, cached_loads,
                                                  monkeypatch):
    monkeypatch.setattr(backends.GigatokenEncoder, "encode", corrupt("Xiyouji"))
    rows = ["Journey to the West (Xiyouji) is a novel."] + data_rows("pretrain")
    code, out, err = run_cli("--tokenizer_path", shared_tokenizer_path("llama2"),
                             "--data_loader_path", write_plugin(rows), "--encode_type",
                             "pretrain", "--max_length", "256", out=tmp_path / "o")
    assert code == 0, err
    info = json.loads((tmp_path / "o" / "c" / "stats.json").read_text())["tokenizer_backend"]
    assert info["name"] == "tokenizers"
    assert "gigatoken not used" in info["reason"] and "Xiyouji" in info["reason"]
    assert "tokenizer backend tokenizers (gigatoken not used" in out


def test_auto_falls_back_when_gigatoken_cannot_load(run_cli, write_plugin, tmp_path,
                                                    cached_loads, monkeypatch):
    def broken(self, *a, **k):
        raise RuntimeError("unsupported model type")
    monkeypatch.setattr(backends.GigatokenEncoder, "__init__", broken)
    code, out, err = encode(run_cli, write_plugin, tmp_path / "o", "gpt2", "qa")
    assert code == 0, err
    assert "gigatoken could not load the tokenizer: RuntimeError: unsupported model type" in out
    # forced, it is an error naming the fix (exit 2), and nothing is written
    code, _, err = encode(run_cli, write_plugin, tmp_path / "f", "gpt2", "qa",
                          "--tokenizer_backend", "gigatoken")
    assert code == 2 and "--tokenizer_backend tokenizers" in err
    assert not (tmp_path / "f" / "c" / "manifest.json").exists()


# -- the sampled cross-check -----------------------------------------------------------------------
def test_cross_check_sample_is_deterministic_and_sparse():
    rows = np.arange(200_000)
    picked = cross_check_sampled(rows, 1000)
    assert 150 <= len(picked) <= 250 and picked[0] == 0
    assert picked.tolist() == cross_check_sampled(rows, 1000).tolist()
    assert len(cross_check_sampled(rows, 0)) == 0


def test_injected_mismatch_stops_the_run_cleanly(run_cli, write_plugin, tmp_path, cached_loads,
                                                 monkeypatch):
    """A row past the first (calibration) batch that gigatoken gets wrong: the run stops with
    exit 1, the row number and both id lists, and leaves no manifest (nothing looks complete)."""
    monkeypatch.setattr(backends.GigatokenEncoder, "encode", corrupt("INJECTED"))
    monkeypatch.setattr("encoder.pipeline.BATCH_ROWS", 2)   # x8 for pretrain: 16-row batches
    rows = [f"plain document number {i}." for i in range(100)]
    rows[70] = "this row is INJECTED with a wrong id"
    code, _, err = run_cli("--tokenizer_path", shared_tokenizer_path("llama2"),
                           "--data_loader_path", write_plugin(rows), "--encode_type", "pretrain",
                           "--max_length", "64", "--cross_check_every", "1",
                           out=tmp_path / "o")
    assert code == 1
    assert "cross-check failed at row 70" in err
    tok = real_tokenizer("llama2")
    good = [1] + tok(rows[70], add_special_tokens=False)["input_ids"] + [2]
    assert f"tokenizers ids: {good}" in err
    bad = list(good)
    bad[1] = (bad[1] + 1) % 1000
    assert f"gigatoken ids: {bad}" in err
    assert not (tmp_path / "o" / "c" / "manifest.json").exists()
    assert not list((tmp_path / "o").rglob("*.bin"))


@pytest.mark.parametrize("encode_type", ["preference", "kto"])
def test_injected_mismatch_names_the_plugin_row_for_pairs(encode_type, run_cli, write_plugin,
                                                          tmp_path, cached_loads, monkeypatch):
    """preference/kto: the sample is taken by plugin row number and the error names that row.
    Row 52 is sampled at --cross_check_every 50 (by its number) but sits at position 1 of its
    3-row batch, which a sample by position would skip (and name as row 1)."""
    assert cross_check_sampled(np.array([52, 1]), 50).tolist() == [0]
    monkeypatch.setattr(backends.GigatokenEncoder, "encode", corrupt("INJECTED"))
    monkeypatch.setattr("encoder.pipeline.BATCH_ROWS", 3)
    answer = {"preference": lambda i, a: {"chosen": a, "rejected": f"No idea {i}."},
              "kto": lambda i, a: {"completion": a, "label": i % 2 == 0}}[encode_type]
    rows = [{"prompt": f"Question {i}?", **answer(i, f"Answer {i}.")} for i in range(80)]
    rows[52] = {"prompt": "Question 52?", **answer(52, "this answer is INJECTED with a wrong id")}
    code, _, err = run_cli("--tokenizer_path", shared_tokenizer_path("llama2"),
                           "--data_loader_path", write_plugin(rows), "--encode_type", encode_type,
                           "--template", "alpaca", "--max_length", "128",
                           "--cross_check_every", "50", out=tmp_path / "o")
    assert code == 1, err
    assert "cross-check failed at row 52:" in err
    assert not (tmp_path / "o" / "c" / "manifest.json").exists()


# -- EncodeArgs / validate_args --------------------------------------------------------------------
def test_validate_args_reports_every_problem_and_mutates_nothing(run_cli):
    from encoder.cli import EncodeArgs, build_parser, validate_args
    ns = build_parser().parse_args(["--tokenizer_path", "t", "--data_loader_path", "p.py",
                                    "--encode_type", "chat", "--max_length", "0",
                                    "--num_workers", "0", "--cross_check_every", "-1",
                                    "--part", "2/2"])
    args = EncodeArgs.from_namespace(ns)
    assert ns.template is None and args.template == "chat"     # resolved in a copy
    problems = validate_args(args)
    assert [p.split()[0] for p in problems] == ["--output_path", "--max_length", "--num_workers",
                                                "--cross_check_every", "--part"]
    code, _, err = run_cli("--tokenizer_path", "t", "--data_loader_path", "p.py",
                           "--encode_type", "qa", "--max_length", "0", "--num_workers", "0")
    assert code == 2 and "2 problems" in err and "--num_workers 0" in err


def test_worker_processes_reuse_the_choice(run_cli, write_plugin, hermetic_tokenizer_dir,
                                           tmp_path, monkeypatch):
    """tokenizers engine with 2 worker processes (each told the engine, not re-choosing) writes
    the same shards as gigatoken in-process; the cross-check runs inside the workers too."""
    monkeypatch.setattr("encoder.pipeline.BATCH_ROWS", 9)
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")    # main() only sets it where unset
    rows = [{"q": f"Question {i}: capital of France? </s>" + " fox" * (i % 7),
             "a": "Paris." + " dog" * (i % 5)} for i in range(60)]
    plugin = write_plugin(rows)
    shards = []
    for engine, workers in (("gigatoken", "1"), ("tokenizers", "2"), ("transformers", "2")):
        out = tmp_path / engine
        code, _, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                               plugin, "--encode_type", "qa", "--max_length", "128",
                               "--tokenizer_backend", engine, "--num_workers", workers,
                               "--cross_check_every", "1", out=out)
        assert code == 0, err
        shards.append([(out / "c" / n).read_bytes() for n in ("c_00000.bin", "c_00000.idx")])
    assert shards[0] == shards[1] == shards[2]
