"""Train a tokenizer on a plugin's text, or extend an existing one with new tokens.

    python -m encoder.tokenizer train --data_loader_path encoder/user_data_loader/text.py \
        --data_loader_args path=../shared/data/wiki_demo.txt split=line \
        --model bpe --vocab_size 8000 --output tok/
    python -m encoder.tokenizer extend --base ../shared/tokenizers/llama2 \
        --data_loader_path encoder/user_data_loader/text.py \
        --data_loader_args path=../shared/data/zh_xiyouji.txt --vocab_size 20000 --output tok_zh/

train: the `tokenizers` library, streaming the plugin's rows (pretrain strings, qa prompt+answer,
chat contents) into its trainer, so memory is bounded by the trainer's pair/word counts, not by
the corpus. Every `--heldout_every`-th row is held out (never trained on) and used for the
tokens/character and bytes/token report.
  --model bpe                    byte-level BPE (GPT-2/Llama-3/Qwen style; never an unknown token)
  --model bpe --sentencepiece    SentencePiece-compatible BPE (Llama-2 layout: <unk> <s> </s>,
                                 256 byte-fallback pieces <0x00>..<0xFF>, "▁" for spaces)
  --model unigram                SentencePiece-compatible unigram (same layout)
SentencePiece-compatible outputs also get a `tokenizer.model` (SentencePiece ModelProto) when the
`sentencepiece` package is installed.

extend: adds the tokens the base lacks, appended after the base's largest id, so every base token
keeps its id (verified on the saved directory and reported).
  * SentencePiece-based bases (a tokenizer.model beside a BPE tokenizer.json with byte fallback,
    e.g. llama2): new pieces are trained with the base's own normaliser/pre-tokenizer and appended
    to the base's SentencePiece ModelProto exactly as Chinese-LLaMA's merge_tokenizers.py does
    (score 0, type NORMAL, skipping pieces the base has); tokenizer.json gets the same pieces with
    their merges appended after all base merges (the layout of the released
    chinese-llama2-alpaca2 tokenizer.json).
  * byte-level BPE bases (gpt2, llama3, qwen3): new tokens and their merges are appended.
  --pieces FILE instead of training: a SentencePiece .model, or a text file with one piece/token
  per line; merges are then derived from the pieces (every split into two known pieces, as
  transformers' SentencePieceExtractor does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder.errors import (EncoderError, EncoderRunError, InputNotFoundError, OutputExistsError,
                            RowError, UsageError, exit_code)
from encoder.plugins import check_row, load_plugin, parse_kv_args, raw_rows

SP_SPECIALS = ("<unk>", "<s>", "</s>")       # Llama-2 / SentencePiece layout: ids 0, 1, 2
BYTE_LEVEL_SPECIALS = ("<s>", "</s>")       # ids 0, 1
PAD_TOKEN = "<pad>"                          # appended after the specials unless given
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
HELDOUT_CHAR_CAP = 4_000_000                 # held-out text kept for the report (~4 MB of str)
MAX_PIECE_CHARS = 16                         # SentencePiece's max_sentencepiece_length default
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_TEMPLATES = {"chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"))}


# ------------------------------------------------------------------------------------ corpus
@dataclass
class Corpus:
    """Streams a plugin's text; every `heldout_every`-th row goes to `heldout` instead."""

    plugin_path: str
    plugin_args: dict
    heldout_every: int = 100
    heldout: list[str] = field(default_factory=list)
    rows: int = 0
    train_chars: int = 0
    heldout_chars: int = 0

    def train_texts(self) -> Iterator[str]:
        """Training text, one string per piece of content; fills `heldout` as it goes."""
        self.heldout, self.rows, self.train_chars, self.heldout_chars = [], 0, 0, 0
        plugin = load_plugin(self.plugin_path)
        for index, row in raw_rows(plugin, self.plugin_args):
            texts = row_texts(self.plugin_path, index, row)
            self.rows += 1
            if self.heldout_every and index % self.heldout_every == self.heldout_every - 1:
                if self.heldout_chars < HELDOUT_CHAR_CAP:
                    self.heldout.extend(texts)
                    self.heldout_chars += sum(len(t) for t in texts)
                continue
            for text in texts:
                self.train_chars += len(text)
                yield text
        if self.rows == 0:
            raise UsageError(f"--data_loader_path {self.plugin_path}: the plugin yielded "
                                     f"no rows")


def row_texts(plugin_path: str, index: int, row: Any) -> list[str]:
    """The text of one plugin row: a pretrain string, qa system+prompt+answer, chat contents."""
    if isinstance(row, str):
        kind = "pretrain"
    elif isinstance(row, dict) and "messages" in row:
        kind = "chat"
    elif isinstance(row, dict):
        kind = "qa"
    else:
        raise RowError(plugin_path, index, f"rows must be str (pretrain) or dicts (qa/chat), got "
                                           f"{type(row).__name__}")
    try:
        checked = check_row(row, encode_type=kind)
    except ValueError as e:
        raise RowError(plugin_path, index, str(e)) from None
    if kind == "pretrain":
        return [checked]
    return [m["content"] for m in checked if m["content"]]


# ------------------------------------------------------------------------------------ measure
@dataclass(frozen=True)
class Density:
    tokens: int
    chars: int
    bytes: int

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / max(self.chars, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def measure(tokenizer, texts: list[str]) -> Density:
    """Tokens of `texts` with no special tokens added (a `tokenizers.Tokenizer`)."""
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return Density(tokens=tokens, chars=sum(len(t) for t in texts),
                   bytes=sum(len(t.encode("utf-8")) for t in texts))


# ------------------------------------------------------------------------------------ train
def _sp_pre_tokenizer(*, split: bool):
    from tokenizers import pre_tokenizers as pt
    return pt.Metaspace(replacement="▁", prepend_scheme="first", split=split)


def _training_pre_tokenizer(encoding_pre_tokenizer):
    """What SentencePiece's trainer does before counting: pieces never cross whitespace
    (split_by_whitespace), punctuation/script changes (split_by_unicode_script) or digits
    (split_digits). Only used for training; encoding keeps the tokenizer's own pre-tokenizer."""
    from tokenizers import pre_tokenizers as pt
    return pt.Sequence([encoding_pre_tokenizer, pt.Punctuation("isolated"),
                        pt.Digits(individual_digits=True)])


def _specials(model: str, sentencepiece: bool, extra: list[str]) -> list[str]:
    base = list(SP_SPECIALS if sentencepiece or model == "unigram" else BYTE_LEVEL_SPECIALS)
    return list(dict.fromkeys(base + [PAD_TOKEN] + list(extra)))


def train_tokenizer(corpus: Corpus, *, model: str, vocab_size: int, sentencepiece: bool = False,
                    special_tokens: list[str] | None = None):
    """A `tokenizers.Tokenizer` trained on `corpus` (streamed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    sp = sentencepiece or model == "unigram"
    specials = _specials(model, sp, special_tokens or [])
    reserved = len(specials) + (len(BYTE_PIECES) if sp else 0)
    if vocab_size <= reserved + 1:
        raise UsageError(f"--vocab_size {vocab_size}: must exceed the {reserved} special "
                                 f"and byte tokens")
    if model == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size - len(BYTE_PIECES),
                                          special_tokens=specials, unk_token="<unk>",
                                          max_piece_length=MAX_PIECE_CHARS, show_progress=False)
    elif sp:
        tok = Tokenizer(models.BPE(byte_fallback=True))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_PIECES),
                                      special_tokens=specials, max_token_length=MAX_PIECE_CHARS,
                                      limit_alphabet=max(vocab_size // 4, 100),
                                      show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    if sp:
        tok.pre_tokenizer = _training_pre_tokenizer(_sp_pre_tokenizer(split=True))
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus.train_texts(), trainer=trainer)
    if sp:
        tok = _sentencepiece_layout(tok, model=model, specials=specials)
    return _add_bos_post_processor(tok, bos="<s>")


def _sentencepiece_layout(trained, *, model: str, specials: list[str]):
    """Rebuild a trained model in the Llama-2 layout: specials, then the 256 byte pieces, then
    the learned pieces; byte fallback on; Metaspace without splitting (as llama2's tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models
    data = json.loads(trained.to_str())
    m = data["model"]
    if model == "unigram":
        learned = [(p, s) for p, s in m["vocab"] if p not in specials]
        vocab = [(p, 0.0) for p in specials] + [(p, 0.0) for p in BYTE_PIECES] + learned
        tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>"), byte_fallback=True))
    else:
        learned = [p for p, _ in sorted(m["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
        order = list(specials) + list(BYTE_PIECES) + [p for p in learned if p not in BYTE_PIECES]
        merges = [tuple(x.split(" ", 1)) if isinstance(x, str) else tuple(x) for x in m["merges"]]
        tok = Tokenizer(models.BPE({p: i for i, p in enumerate(order)}, merges, byte_fallback=True,
                                   fuse_unk=True, unk_token="<unk>"))
    tok.add_special_tokens(list(specials))
    tok.pre_tokenizer = _sp_pre_tokenizer(split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def _add_bos_post_processor(tok, *, bos: str):
    from tokenizers import processors
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tok


def save_hf_dir(tok, out: Path, *, sentencepiece: bool, specials: list[str],
                chat_template: str | None) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat template) that AutoTokenizer loads."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    extra = [t for t in specials if t not in (*SP_SPECIALS, *BYTE_LEVEL_SPECIALS, PAD_TOKEN)]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": PAD_TOKEN, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30}
    if sentencepiece:
        config["unk_token"] = "<unk>"
    if extra:
        config["additional_special_tokens"] = extra
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def resolve_chat_template(value: str | None) -> tuple[str | None, list[str]]:
    """--chat_template NAME|FILE -> (jinja text, special tokens it needs)."""
    if not value:
        return None, []
    if value in CHAT_TEMPLATES:
        text, tokens = CHAT_TEMPLATES[value]
        return text, list(tokens)
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"--chat_template {value}: neither a bundled name "
                                 f"({', '.join(CHAT_TEMPLATES)}) nor a jinja file")
    return path.read_text(encoding="utf-8"), []


def write_sentencepiece_model(tok, out: Path, *, model: str) -> bool:
    """tokenizer.model (SentencePiece ModelProto) for a SentencePiece-layout tokenizer; False
    when the sentencepiece package is missing. BPE scores are -rank of the piece (later merges
    lower), unigram scores are the learned log-probabilities."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        return False
    data = json.loads(tok.to_str())
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM if model == "unigram" else pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    if model == "unigram":
        pieces = [(p, s) for p, s in data["model"]["vocab"]]
    else:
        vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
        pieces = [(p, -float(i)) for p, i in vocab]
    specials = {t["content"] for t in data["added_tokens"]}
    for piece, score in pieces:
        sp = proto.pieces.add()
        sp.piece, sp.score = piece, score
        if piece == "<unk>":
            sp.type = pb.ModelProto.SentencePiece.UNKNOWN
        elif piece in specials:
            sp.type = pb.ModelProto.SentencePiece.CONTROL
        elif piece in BYTE_PIECES:
            sp.type, sp.score = pb.ModelProto.SentencePiece.BYTE, 0.0
        else:
            sp.type = pb.ModelProto.SentencePiece.NORMAL
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    return True


# ------------------------------------------------------------------------------------ extend
@dataclass
class Extension:
    """The result of `extend_tokenizer`, for the report."""
    base_len: int
    new_len: int
    added: list[str]
    helpers: list[str]              # prefixes added so that BPE can build a requested piece
    kind: str                       # "sentencepiece" | "byte-level BPE"


def _base_json(base: Path) -> dict:
    path = base / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"--base {base}: no tokenizer.json (extend needs a fast tokenizer "
                                 f"directory; convert a slow one with AutoTokenizer.from_pretrained"
                                 f"(...).save_pretrained(...))")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["model"].get("type") != "BPE":
        raise UsageError(f"--base {base}: tokenizer.json model is "
                                 f"{data['model'].get('type')!r}; extend supports BPE bases "
                                 f"(SentencePiece-BPE such as llama2, byte-level BPE such as gpt2)")
    return data


def base_kind(data: dict) -> str:
    return "byte-level BPE" if "ByteLevel" in json.dumps(data.get("pre_tokenizer")) else "sentencepiece"


def _all_ids(data: dict) -> dict[str, int]:
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return ids


def _merge_pairs(data: dict) -> list[tuple[str, str]]:
    return [tuple(x.split(" ", 1)) if isinstance(x, str) else tuple(x) for x in data["model"]["merges"]]


def train_new_pieces(base_data: dict, corpus: Corpus, vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train a BPE with the base's own normaliser and pre-tokenizer on the corpus; returns its
    pieces (in learned order) and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    kind = base_kind(base_data)
    tok = Tokenizer(models.BPE())
    spec = {k: base_data.get(k) for k in ("normalizer", "pre_tokenizer")}
    probe = Tokenizer.from_str(json.dumps({**json.loads(tok.to_str()), **spec}))
    if kind == "byte-level BPE":
        tok.pre_tokenizer = probe.pre_tokenizer
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                      show_progress=False)
    else:
        tok.pre_tokenizer = _training_pre_tokenizer(_sp_pre_tokenizer(split=True))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, max_token_length=MAX_PIECE_CHARS,
                                      limit_alphabet=max(vocab_size // 4, 100), show_progress=False)
    if probe.normalizer is not None:
        tok.normalizer = probe.normalizer
    tok.train_from_iterator(corpus.train_texts(), trainer=trainer)
    data = json.loads(tok.to_str())
    pieces = [p for p, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    return pieces, _merge_pairs(data)


def read_pieces_file(path: Path, kind: str) -> list[str]:
    """Pieces from a SentencePiece .model or a text file (one per line; spaces become ▁ /
    byte-level symbols as the base writes them)."""
    if path.suffix == ".model":
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
        normal = (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED)
        return [p.piece for p in proto.pieces if p.type in normal]
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line.strip()]
    if kind == "byte-level BPE":
        byte_to_char = _byte_level_table()
        return ["".join(byte_to_char[b] for b in line.encode("utf-8")) for line in lines]
    return [line.replace(" ", "▁") for line in lines]


def _byte_level_table() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def derived_merges(pieces: list[str], vocab: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(pieces in id order, merges) for `pieces`: every split of a piece into two known pieces
    (SentencePieceExtractor's rule). A piece with no such split gets its prefix added first
    (recursively), so BPE can build it; those helper pieces are returned in the order too."""
    known = set(vocab)
    order: list[str] = []
    merges: list[tuple[str, str]] = []

    def ensure(piece: str) -> None:
        if piece in known:
            return
        if len(piece) > 1:
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in known and piece[k:] in known]
            if not splits:
                ensure(piece[:-1])
                ensure(piece[-1])
                splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                          if piece[:k] in known and piece[k:] in known]
            merges.extend(splits)
        known.add(piece)
        order.append(piece)

    for piece in pieces:
        ensure(piece)
    return order, merges


def extend_tokenizer(base: Path, out: Path, *, corpus: Corpus | None = None,
                     vocab_size: int | None = None, pieces_file: Path | None = None) -> Extension:
    """Write `out/`: the base tokenizer plus the new pieces (ids after the base's largest id)."""
    data = _base_json(base)
    kind = base_kind(data)
    ids = _all_ids(data)
    next_id = max(ids.values()) + 1
    vocab = dict(data["model"]["vocab"])
    if pieces_file is not None:
        candidates = read_pieces_file(pieces_file, kind)
        trained_merges = None
    else:
        candidates, trained_merges = train_new_pieces(data, corpus, vocab_size)
    if kind == "byte-level BPE":
        single = set(_byte_level_table().values())
    else:
        single = set()
    added = [p for p in dict.fromkeys(candidates) if p not in ids and p not in single
             and p not in BYTE_PIECES]
    if trained_merges is not None:
        new_set, known = set(added), set(vocab) | set(added)
        merges = [(a, b) for a, b in trained_merges if a + b in new_set and a in known and b in known]
        reachable = {a + b for a, b in merges}
        if any(len(p) > 1 and p not in reachable for p in added):
            # built from pieces the base lacks that were not kept: derive (rare)
            added, extra = derived_merges(added, set(vocab))
            merges += extra
    else:
        added, merges = derived_merges(added, set(vocab))
    helpers = [p for p in added if p not in set(candidates)]
    for k, piece in enumerate(added):
        vocab[piece] = next_id + k
    existing = set(_merge_pairs(data))
    merges = [m for m in dict.fromkeys(merges) if m not in existing]
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [list(m) for m in _merge_pairs(data)] + [list(m) for m in merges]
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():  # config, special tokens map, chat template ...
        if f.is_file() and f.name not in ("tokenizer.json", "tokenizer.model"):
            shutil.copy2(f, out / f.name)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1),
                                        encoding="utf-8")
    if kind == "sentencepiece" and (base / "tokenizer.model").is_file():
        merge_sentencepiece_model(base / "tokenizer.model", out / "tokenizer.model", added)
    return Extension(base_len=len(ids), new_len=len(ids) + len(added), added=added,
                     helpers=helpers, kind=kind)


def merge_sentencepiece_model(base_model: Path, out_model: Path, pieces: list[str]) -> None:
    """Chinese-LLaMA's merge_tokenizers.py: append each new piece (score 0) to the base proto."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        print(f"note: sentencepiece is not installed; {out_model.name} not written (tokenizer.json "
              f"is complete; pip install sentencepiece protobuf for the .model)", file=sys.stderr)
        return
    proto = pb.ModelProto()
    proto.ParseFromString(base_model.read_bytes())
    have = {p.piece for p in proto.pieces}
    for piece in pieces:
        if piece not in have:
            new = pb.ModelProto().SentencePiece()
            new.piece, new.score = piece, 0.0
            proto.pieces.append(new)
    out_model.write_bytes(proto.SerializeToString())


def verify_base_ids(base: Path, out: Path) -> tuple[int, list[tuple[str, int, int | None]]]:
    """Load both with AutoTokenizer; every base token must have the same id in the output.
    Returns (number of base tokens, [(token, base id, new id)] that moved)."""
    from transformers import AutoTokenizer
    old = AutoTokenizer.from_pretrained(str(base)).get_vocab()
    new = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    moved = [(t, i, new.get(t)) for t, i in sorted(old.items(), key=lambda kv: kv[1]) if new.get(t) != i]
    return len(old), moved


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m encoder.tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def corpus_flags(p, required: bool):
        p.add_argument("--data_loader_path", required=required, help="plugin .py (data_loader())")
        p.add_argument("--data_loader_args", nargs="*", default=[], help="key=value for data_loader")
        p.add_argument("--heldout_every", type=int, default=100,
                       help="every N-th row is held out for the tokens/char report (0: none)")

    t = sub.add_parser("train", help="train a new tokenizer on a plugin's text")
    corpus_flags(t, required=True)
    t.add_argument("--model", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--sentencepiece", action="store_true",
                   help="--model bpe: SentencePiece-compatible (Llama-2 layout, byte fallback) "
                        "instead of byte-level (unigram is always SentencePiece-compatible)")
    t.add_argument("--vocab_size", type=int, required=True)
    t.add_argument("--special_tokens", nargs="*", default=[],
                   help="extra special tokens (after <unk>/<s>/</s>/<pad>)")
    t.add_argument("--chat_template", help=f"bundled name ({', '.join(CHAT_TEMPLATES)}) or a jinja file")
    t.add_argument("--output", required=True)
    e = sub.add_parser("extend", help="add new tokens to an existing tokenizer, keeping every id")
    e.add_argument("--base", required=True, help="Hugging Face tokenizer directory")
    corpus_flags(e, required=False)
    e.add_argument("--vocab_size", type=int, help="size of the vocabulary trained on the corpus "
                   "(Chinese-LLaMA: 20000); the tokens the base lacks are added")
    e.add_argument("--pieces", help="instead of training: a SentencePiece .model or a file with "
                   "one piece per line")
    e.add_argument("--output", required=True)
    return ap


def _check_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"--output {out} exists and is not empty; choose a new directory")


def _print_density(label: str, d: Density) -> None:
    print(f"{label}: {d.tokens_per_char:.4f} tokens/char, {d.bytes_per_token:.3f} bytes/token "
          f"({d.tokens} tokens, {d.chars} chars)")


def heldout_texts(corpus: Corpus) -> tuple[list[str], str]:
    if corpus.heldout:
        return corpus.heldout, f"held-out slice (every {corpus.heldout_every}th row, {len(corpus.heldout)} texts)"
    raise UsageError(
        f"--data_loader_path {corpus.plugin_path}: only {corpus.rows} rows, so no row was held "
        f"out with --heldout_every {corpus.heldout_every}; lower it (or split the text into more "
        f"rows, e.g. split=paragraph for text.py)")


def run_train(args) -> None:
    from tokenizers import Tokenizer
    out = Path(args.output)
    _check_output(out)
    template, template_tokens = resolve_chat_template(args.chat_template)
    extra = list(args.special_tokens) + template_tokens
    corpus = Corpus(args.data_loader_path, parse_kv_args(args.data_loader_args), args.heldout_every)
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus, model=args.model, vocab_size=args.vocab_size,
                          sentencepiece=args.sentencepiece, special_tokens=extra)
    sp = args.sentencepiece or args.model == "unigram"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    specials = _specials(args.model, sp, extra)
    save_hf_dir(tok, tmp, sentencepiece=sp, specials=specials, chat_template=template)
    wrote_model = sp and write_sentencepiece_model(tok, tmp, model=args.model)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp))  # must load; also what the encoder uses
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    kind = {"unigram": "SentencePiece-compatible unigram"}.get(
        args.model, "SentencePiece-compatible BPE" if sp else "byte-level BPE")
    print(f"trained {kind}, {len(hf)} tokens, on {corpus.rows} rows ({corpus.train_chars} chars "
          f"trained) in {time.perf_counter() - t0:.1f}s -> {out}"
          + (" (+ tokenizer.model)" if wrote_model else ""))
    if len(hf) < args.vocab_size:
        print(f"note: {len(hf)} < --vocab_size {args.vocab_size}: the corpus has no more pairs "
              f"worth merging")
    texts, where = heldout_texts(corpus)
    _print_density(f"{where}", measure(Tokenizer.from_file(str(out / "tokenizer.json")), texts))


def run_extend(args) -> None:
    from tokenizers import Tokenizer
    base, out = Path(args.base), Path(args.output)
    if (args.pieces is None) == (args.data_loader_path is None):
        raise UsageError("extend: give either --data_loader_path P --vocab_size N, or "
                                 "--pieces FILE")
    if args.data_loader_path and not args.vocab_size:
        raise UsageError("extend: --data_loader_path needs --vocab_size N (the size of the "
                                 "vocabulary trained on the corpus)")
    if args.pieces and not Path(args.pieces).is_file():
        raise InputNotFoundError(f"--pieces {args.pieces}: no such file")
    if not base.is_dir():
        raise InputNotFoundError(f"--base {base}: not a directory (give a Hugging Face tokenizer "
                                 f"directory with tokenizer.json)")
    _check_output(out)
    corpus = (Corpus(args.data_loader_path, parse_kv_args(args.data_loader_args), args.heldout_every)
              if args.data_loader_path else None)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    ext = extend_tokenizer(base, tmp, corpus=corpus, vocab_size=args.vocab_size,
                           pieces_file=Path(args.pieces) if args.pieces else None)
    n_base, moved = verify_base_ids(base, tmp)
    if moved:
        shutil.rmtree(tmp)
        raise EncoderRunError(f"{len(moved)} base tokens changed id, e.g. {moved[:5]}; nothing written")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"extended {ext.kind} tokenizer {base}: {ext.base_len} -> {ext.new_len} tokens "
          f"(+{len(ext.added)}) in {time.perf_counter() - t0:.1f}s -> {out}")
    print(f"verified: all {n_base} base tokens keep their ids (loaded back with AutoTokenizer)")
    if ext.helpers:
        print(f"note: {len(ext.helpers)} helper pieces were added so that BPE can build the "
              f"requested ones (e.g. {ext.helpers[:5]})")
    if corpus is not None:
        texts, where = heldout_texts(corpus)
        before = measure(Tokenizer.from_file(str(base / "tokenizer.json")), texts)
        after = measure(Tokenizer.from_file(str(out / "tokenizer.json")), texts)
        _print_density(f"before ({base.name}) on {where}", before)
        _print_density(f"after  ({out.name}) on {where}", after)
        print(f"tokens for the same text: {after.tokens / max(before.tokens, 1) - 1:+.1%}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "heldout_every", 0) < 0:
            raise UsageError("--heldout_every must be >= 0")
        if getattr(args, "vocab_size", None) is not None and args.vocab_size < 1:
            raise UsageError(f"--vocab_size must be >= 1 (got {args.vocab_size})")
        run_train(args) if args.command == "train" else run_extend(args)
    except EncoderError as e:   # ours only: anything else is a bug and keeps its traceback
        print(f"encoder.tokenizer: {'error' if exit_code(e) == 2 else 'failed'}: {e}", file=sys.stderr)
        return exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
