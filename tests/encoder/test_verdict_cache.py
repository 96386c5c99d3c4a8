"""The calibration-verdict / vocab-hash cache (encoder/verdict_cache.py): keyed so that another
tokenizer.json, library version or calibration set never reuses an entry; foreign or corrupt
entries ignored; atomic JSON writes; a cached pass never skips the user's first batch, and a
mismatch is still refused (auto falls back, a forced gigatoken fails) with a verdict cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import encoder.backends as backends
import encoder.verdict_cache as verdict_cache
from encoder.backends import CALIBRATION_TEXTS, Ragged, choose_backend
from encoder.errors import BackendError
from encoder.json_tokenizer import JsonTokenizer
from encoder.tokenizer_policy import load_encoding_tokenizer
from encoder.verdict_cache import (VerdictCache, cached_tokenizer_identity, default_cache_dir)
from shardfmt import tokenizer_identity

FIRST_BATCH = ["The quick brown fox jumps.", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def tok(hermetic_tokenizer_dir):
    t = load_encoding_tokenizer(hermetic_tokenizer_dir)
    assert isinstance(t, JsonTokenizer)   # the light loader: the only kind the cache serves
    return t


def entry(tok, directory, calibration=CALIBRATION_TEXTS) -> VerdictCache:
    """A fresh VerdictCache object (nothing remembered from an earlier one)."""
    return VerdictCache.for_tokenizer(tok, calibration=calibration, directory=directory)


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


# -- keys ------------------------------------------------------------------------------------------
def test_every_key_part_invalidates(tok, hermetic_tokenizer_dir, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    assert entry(tok, cache_dir).record_calibration_pass(strings=len(CALIBRATION_TEXTS))
    hit = entry(tok, cache_dir).calibration_pass()
    assert hit["verdict"] == "equal" and hit["strings"] == len(CALIBRATION_TEXTS)

    # another calibration set (a string added, or the same strings joined differently)
    for calibration in (CALIBRATION_TEXTS + ("a new hard string",),
                        ("".join(CALIBRATION_TEXTS[:2]),) + CALIBRATION_TEXTS[2:]):
        other = entry(tok, cache_dir, calibration)
        assert other.path != entry(tok, cache_dir).path and other.calibration_pass() is None

    # another tokenizer.json: one byte more (same vocabulary, still another file)
    copy = tmp_path / "tok2"
    shutil.copytree(hermetic_tokenizer_dir, copy)
    with open(copy / "tokenizer.json", "a", encoding="utf-8") as f:
        f.write("\n")
    other = entry(JsonTokenizer(str(copy)), cache_dir)
    assert other.key["tokenizer_json"] != entry(tok, cache_dir).key["tokenizer_json"]
    assert other.calibration_pass() is None

    # another gigatoken or tokenizers version (read from the installed distribution)
    from importlib.metadata import version
    assert verdict_cache.library_version("gigatoken") == version("gigatoken")
    assert entry(tok, cache_dir).key["gigatoken"] == version("gigatoken")
    monkeypatch.setattr(verdict_cache, "library_version", lambda name: "99.0.0")
    assert entry(tok, cache_dir).calibration_pass() is None
    monkeypatch.undo()
    import tokenizers
    monkeypatch.setattr(tokenizers, "__version__", "99.0.0")
    assert entry(tok, cache_dir).calibration_pass() is None
    monkeypatch.undo()
    assert entry(tok, cache_dir).calibration_pass() is not None


def test_foreign_or_corrupt_entries_are_ignored_and_writes_are_atomic(tok, tmp_path):
    cache = entry(tok, tmp_path)
    cache.path.parent.mkdir(parents=True)
    for text in ("{not json", "[]", json.dumps({"calibration": {"verdict": "equal"}}),
                 # the right file name, but another key (e.g. copied from another machine)
                 json.dumps({"key": {**cache.key, "gigatoken": "0.9.0"},
                             "calibration": {"verdict": "equal", "strings": 31},
                             "vocab_hash": "deadbeef"}),
                 json.dumps({"key": cache.key, "calibration": {"verdict": "different"}})):
        cache.path.write_text(text, encoding="utf-8")
        fresh = entry(tok, tmp_path)
        assert fresh.calibration_pass() is None
        assert fresh.vocab_hash() is None
    assert entry(tok, tmp_path).record_vocab_hash("abc123")
    assert entry(tok, tmp_path).record_calibration_pass(strings=7)
    # both fields kept, JSON only, no temporary file left beside the entry
    data = json.loads(cache.path.read_text(encoding="utf-8"))
    assert data["key"] == cache.key and data["vocab_hash"] == "abc123"
    assert data["calibration"]["strings"] == 7
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]


def test_unwritable_cache_is_skipped(tok, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cache = entry(tok, blocker)
    assert cache.record_calibration_pass(strings=31) is False
    assert entry(tok, blocker).calibration_pass() is None


def test_off_and_transformers_tokenizers_are_not_cached(tok, hermetic_tokenizer_dir, tmp_path,
                                                        monkeypatch):
    for off in ("off", "0", ""):
        monkeypatch.setenv("LLM_ENCODE_CACHE", off)
        assert default_cache_dir() is None
        assert VerdictCache.for_tokenizer(tok, calibration=CALIBRATION_TEXTS) is None
    monkeypatch.setenv("LLM_ENCODE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    # a transformers tokenizer may differ from its tokenizer.json: always calibrated in full
    hf = load_encoding_tokenizer(hermetic_tokenizer_dir, backend="transformers")
    assert VerdictCache.for_tokenizer(hf, calibration=CALIBRATION_TEXTS) is None


# -- the choice ------------------------------------------------------------------------------------
def test_cached_pass_skips_builtin_strings_never_the_first_batch(tok, tmp_path, monkeypatch):
    seen: list = []
    real = backends.GigatokenEncoder.encode

    def spy(self, texts):
        seen.append(list(texts))
        return real(self, texts)
    monkeypatch.setattr(backends.GigatokenEncoder, "encode", spy)
    engine, _, why = choose_backend("auto", tok, texts=FIRST_BATCH, cache_dir=tmp_path)
    assert engine.name == "gigatoken" and "cached" not in why
    assert seen[-1] == list(CALIBRATION_TEXTS) + FIRST_BATCH
    engine, _, why = choose_backend("auto", tok, texts=FIRST_BATCH, cache_dir=tmp_path)
    assert engine.name == "gigatoken" and seen[-1] == FIRST_BATCH
    assert "cached verdict" in why and f"{len(CALIBRATION_TEXTS)} calibration strings" in why
    assert f"{len(FIRST_BATCH)} texts of the first batch (this run)" in why

    # with the verdict cached, a first batch gigatoken gets wrong is still caught
    monkeypatch.setattr(backends.GigatokenEncoder, "encode", corrupt("fox"))
    engine, reference, why = choose_backend("auto", tok, texts=FIRST_BATCH, cache_dir=tmp_path)
    assert engine.name == "tokenizers" and engine is reference
    assert "gigatoken not used" in why and "fox" in why
    with pytest.raises(BackendError, match="--tokenizer_backend tokenizers"):
        choose_backend("gigatoken", tok, texts=FIRST_BATCH, cache_dir=tmp_path)
    assert entry(tok, tmp_path).calibration_pass() is not None   # the pass itself still holds


def test_failed_calibration_is_never_cached(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(backends.GigatokenEncoder, "encode", corrupt("supercalifragilistic"))
    engine, _, why = choose_backend("auto", tok, texts=FIRST_BATCH, cache_dir=tmp_path)
    assert engine.name == "tokenizers" and "supercalifragilistic" in why
    assert entry(tok, tmp_path).calibration_pass() is None
    with pytest.raises(BackendError):   # the next run checks, and refuses, again
        choose_backend("gigatoken", tok, texts=FIRST_BATCH, cache_dir=tmp_path)
    assert entry(tok, tmp_path).calibration_pass() is None


def test_cached_identity_equals_the_computed_one(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ENCODE_CACHE", str(tmp_path))
    expected = tokenizer_identity(tok)
    assert cached_tokenizer_identity(tok) == expected          # miss: computed and stored
    assert entry(tok, tmp_path).vocab_hash() == expected["vocab_hash"]

    def no_get_vocab(self):
        raise AssertionError("the cached vocab hash should have been used")
    monkeypatch.setattr(JsonTokenizer, "get_vocab", no_get_vocab)
    assert cached_tokenizer_identity(tok) == expected          # hit


def test_second_cli_run_uses_the_cache_and_writes_the_same_bytes(
        run_cli, write_plugin, hermetic_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ENCODE_CACHE", str(tmp_path / "cache"))
    plugin = write_plugin([f"The quick brown fox number {i}. Paris is in France." * (i % 5 + 1)
                           for i in range(300)])
    reasons, outs = [], []
    for k in range(2):
        out = tmp_path / f"o{k}"
        code, _, err = run_cli("--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
                               plugin, "--encode_type", "pretrain", "--max_length", "128", out=out)
        assert code == 0, err
        outs.append(out / "c")
        reasons.append(json.loads((out / "c" / "stats.json").read_text())
                       ["tokenizer_backend"]["reason"])
    assert "cached" not in reasons[0] and "cached verdict" in reasons[1]
    bins = [sorted(p.glob("*.bin")) for p in outs]
    assert [b.read_bytes() for b in bins[0]] == [b.read_bytes() for b in bins[1]]
    manifests = [json.loads((p / "manifest.json").read_text()) for p in outs]
    assert manifests[0]["tokenizer"] == manifests[1]["tokenizer"]
    assert manifests[0]["tokenizer"]["vocab_hash"]
