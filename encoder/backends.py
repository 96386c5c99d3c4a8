"""Text -> token ids through one of three engines, chosen and verified once per run.

  gigatoken     Rust BPE (`gigatoken.Tokenizer(tokenizers_object)`), 6-8x HF `tokenizers` on this
                machine; returns one flat id array + offsets per batch (no Python list per doc).
  tokenizers    the HF `tokenizers` object that transformers 5 itself runs (`encode_batch_fast`).
  transformers  `tokenizer(texts, add_special_tokens=False)`: the reference API, slowest.

Every engine encodes with add_special_tokens=False, and text that spells a special token
(`<|im_end|>`) is parsed the way the tokenizer parses it; the encoder re-encodes such texts with
`encode_split` (special tokens split into plain text) when they would yield a control token. The
split path always runs on the reference library, on a private copy (never a flag toggled on the
caller's tokenizer).

`choose_backend("auto", ...)` takes gigatoken only if it loads the tokenizer AND its ids equal the
reference on `CALIBRATION_TEXTS` plus the run's first batch of texts; otherwise `tokenizers`, then
`transformers`, with the reason recorded. A pass on `CALIBRATION_TEXTS` is cached per
tokenizer.json content and library versions (verdict_cache.py), so later runs compare only the
first batch (still on every run). `cross_check_rows` re-encodes a deterministic sample of
rows with the reference while encoding (see document_encoder.py).

>>> enc, why = choose_backend("auto", tok, texts=["Hi there"])          # doctest: +SKIP
>>> enc.name, why
('gigatoken', 'ids equal to tokenizers on 31 calibration strings + 1 texts of the first batch')
"""

from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple, Protocol

import numpy as np

from encoder.errors import BackendError

TOKENIZER_BACKENDS = ("auto", "gigatoken", "tokenizers", "transformers")
# Strings on which tokenizer implementations are known to diverge: special-token text,
# whitespace runs and CR/LF/tab mixes (pre-tokenizer regexes), CJK/emoji/ZWJ/combining marks
# (byte fallback, normalizers), NBSP/RTL, very long words and numbers (digit splitting, caps).
CALIBRATION_TEXTS = (
    "<|im_end|> <|im_start|>user\n</s><s> <|endoftext|> <|eot_id|><|begin_of_text|>",
    "text</s>more <unk> <pad> [INST] <<SYS>> <|end_of_text|> <think></think>",
    "a  b   c    d\t\te\t \tf", "   leading and trailing   ", "\n", "\n\n\n", " \n \n",
    "line1\r\nline2\rline3\n\rline4", "tab\tthen\r\n\ttab", "",
    "中文文本，包含标点。混合English和数字123。", "日本語のテキスト、カタカナ、ひらがな",
    "한국어 텍스트", "emoji 😀🎉🚀 and flags 🇺🇸🇨🇳",
    "family 👨\u200d👩\u200d👧\u200d👦 and rainbow 🏳\ufe0f\u200d🌈",
    "combining e\u0301 n\u0303 a\u0308 \u1e9b\u0323", "Zalgo t\u0337\u0332e\u0336\u0331x\u0335t",
    "non\u00a0breaking\u00a0space and\u2009thin\u202fspaces", "zero\u200bwidth\u200cjoin\u200d",
    "שלום עולם", "مرحبا بالعالم", "mixed עברית and English",
    "x" * 3000, "supercalifragilisticexpialidocious" * 40, "1234567890" * 60,
    "3.14159265358979323846 1,000,000 -42 0x1F 1e-10",
    "def f(x):\n    return x ** 2  # comment\n\n\n\tpass",
    "<html><body><p>&nbsp;&amp;</p></body></html>", "\u0000\u0001\u007f control chars",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ ligature Ⅻ ①", "'s 't 're 've 'm 'll 'd 'S 'T",
)


class Ragged(NamedTuple):
    """A batch of id lists as one flat array + offsets (row i = flat[offsets[i]:offsets[i+1]]).

    >>> r = Ragged.from_lists([[1, 2], [], [3]])
    >>> r.offsets.tolist(), r.tolists()
    ([0, 2, 2, 3], [[1, 2], [], [3]])
    """

    flat: np.ndarray      # int64 ids
    offsets: np.ndarray   # int64, len rows + 1

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> "Ragged":
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.fromiter((t for row in lists for t in row), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def tolists(self) -> list[list[int]]:
        flat = self.flat.tolist()
        off = self.offsets.tolist()
        return [flat[a:b] for a, b in zip(off[:-1], off[1:])]

    def replace_rows(self, rows: dict[int, list[int]]) -> "Ragged":
        """A copy with some rows replaced (the rare guard path; per-row Python is fine here)."""
        lists = self.tolists()
        for i, ids in rows.items():
            lists[i] = list(ids)
        return Ragged.from_lists(lists)


class TextEncoder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> Ragged: ...

    def encode_split(self, texts: list[str]) -> list[list[int]]: ...


# -- engines ---------------------------------------------------------------------------------------
class TransformersEncoder:
    """`tok(texts, add_special_tokens=False)`; also serves a JsonTokenizer (same call API).
    Split-special encoding goes through `split_with` (a TokenizersEncoder's private copy) when
    the tokenizer has a `tokenizers` backend: transformers leaves the backend's
    `encode_special_tokens` flag set after a `split_special_tokens=True` call, which would leak
    into later plain calls on the same object."""

    name = "transformers"

    def __init__(self, tok: Any, *, split_with: Any = None):
        self.tok = tok
        self._split_with = split_with

    def encode(self, texts: list[str]) -> Ragged:
        return Ragged.from_lists(self.encode_lists(texts))

    def encode_lists(self, texts: list[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False,
                        split_special_tokens=False)["input_ids"]

    def encode_split(self, texts: list[str]) -> list[list[int]]:
        if self._split_with is not None:
            return self._split_with.encode_split(texts)
        return self.tok(list(texts), add_special_tokens=False,
                        split_special_tokens=True)["input_ids"]


class TokenizersEncoder:
    """The tokenizer's `tokenizers.Tokenizer` backend, read-only (its flags are never set here);
    the split-special path uses a private copy made on first use (qwen3: 1-3 s, only for data
    that spells control tokens). A backend left in split mode by someone else is not used:
    a private plain copy is made instead."""

    name = "tokenizers"

    def __init__(self, tok: Any):
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            raise BackendError(f"tokenizer {getattr(tok, 'name_or_path', '')} has no `tokenizers` "
                               f"backend (a slow tokenizer); use --tokenizer_backend transformers")
        self._source = backend
        self._plain_copy = None
        self._split = None
        self._lock = threading.Lock()

    def _copy(self, *, split: bool) -> Any:
        return _private_copy(self._source, split=split)

    def _plain(self) -> Any:
        if not self._source.encode_special_tokens:
            return self._source
        with self._lock:
            if self._plain_copy is None:
                self._plain_copy = self._copy(split=False)
        return self._plain_copy

    def encode(self, texts: list[str]) -> Ragged:
        return Ragged.from_lists(self.encode_lists(texts))

    def encode_lists(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._plain().encode_batch_fast(list(texts),
                                                                add_special_tokens=False)]

    def encode_split(self, texts: list[str]) -> list[list[int]]:
        with self._lock:
            if self._split is None:
                self._split = self._copy(split=True)
        return [e.ids for e in self._split.encode_batch_fast(list(texts), add_special_tokens=False)]


_COPIES: dict = {}   # (id(source), vocab size, split) -> (source, copy); a few entries at most


def _private_copy(source: Any, *, split: bool) -> Any:
    """A private `tokenizers.Tokenizer` equal to `source` with encode_special_tokens=`split`.
    Serializing and parsing costs 1-3 s for qwen3, so copies are kept per source object (the
    source is held too, so its id cannot be reused; the vocabulary size catches added tokens)."""
    import tokenizers

    key = (id(source), source.get_vocab_size(with_added_tokens=True), split)
    if key not in _COPIES:
        if len(_COPIES) >= 8:
            _COPIES.clear()
        copy = tokenizers.Tokenizer.from_str(source.to_str())
        copy.encode_special_tokens = split   # a private object: setting its flag is ours to do
        _COPIES[key] = (source, copy)
    return _COPIES[key][1]


class GigatokenEncoder:
    """gigatoken over the tokenizer's `tokenizers` backend. `parallel`: use gigatoken's own thread
    pool (sized by RAYON_NUM_THREADS, which main() sets from --num_workers); False inside worker
    processes. Special-token splitting goes to the reference (`split_with`)."""

    name = "gigatoken"

    def __init__(self, tok: Any, *, split_with: Any, parallel: bool = True):
        import gigatoken

        source = getattr(tok, "backend_tokenizer", None)
        if source is None:
            raise BackendError("gigatoken needs a tokenizer.json (`tokenizers`) backend; this "
                               "tokenizer has none")
        started = time.perf_counter()
        json_bytes = getattr(tok, "json_bytes", None)
        if type(tok).__name__ == "JsonTokenizer" and json_bytes is not None:
            # the bytes `tokenizers` parsed *are* the backend: parsing them skips serializing
            # the loaded object (qwen3: ~0.25-1.3 s of to_str) and re-reading the file
            self._gt = gigatoken.Tokenizer.from_json(json_bytes)
        else:   # transformers (maybe with added tokens): its live backend object
            self._gt = gigatoken.Tokenizer(source)
        self.build_seconds = time.perf_counter() - started   # for the start-up line
        self._split_with = split_with
        self.parallel = parallel

    def encode(self, texts: list[str]) -> Ragged:
        import awkward as ak  # a gigatoken dependency

        layout = ak.to_layout(self._gt.encode_batch(list(texts), parallel=self.parallel))
        offsets = np.asarray(layout.offsets.data, dtype=np.int64)
        flat = np.asarray(layout.content.data)[offsets[0]:offsets[-1]].astype(np.int64)
        return Ragged(flat, offsets - offsets[0])

    def encode_split(self, texts: list[str]) -> list[list[int]]:
        return self._split_with.encode_split(texts)


# -- choice ----------------------------------------------------------------------------------------
def reference_encoder(tok: Any) -> Any:
    """The independent reference: HF `tokenizers` when the tokenizer has that backend and it gives
    `tok(...)`'s ids on the calibration strings, else `tok(...)` itself."""
    try:
        fast = TokenizersEncoder(tok)
    except BackendError:
        return TransformersEncoder(tok)
    if type(tok).__name__ == "JsonTokenizer":  # tok(...) is this very `tokenizers` object
        return fast
    slow = TransformersEncoder(tok, split_with=fast)
    probe = list(CALIBRATION_TEXTS)
    return fast if fast.encode_lists(probe) == slow.encode_lists(probe) else slow


def _calibrated_gigatoken(tok: Any, reference: Any, *, texts: list[str], parallel: bool,
                          cache_dir: Any) -> tuple[Any, str | None, str]:
    """`(engine or None, problem or None, what was compared)`: gigatoken built and compared with
    `reference` on the calibration set (unless a cached pass covers it) + `texts`."""
    from encoder.verdict_cache import VerdictCache

    cache = None if reference.name != "tokenizers" else VerdictCache.for_tokenizer(
        tok, calibration=CALIBRATION_TEXTS, directory=cache_dir)
    cached = cache.calibration_pass() if cache is not None else None
    calib = list(texts) if cached else list(CALIBRATION_TEXTS) + list(texts)
    what = (f"{len(texts)} texts of the first batch (this run) and on {len(CALIBRATION_TEXTS)} "
            f"calibration strings (cached verdict of {cached.get('checked_utc', '?')}: "
            f"{cache.path})" if cached
            else f"{len(CALIBRATION_TEXTS)} calibration strings + {len(texts)} texts of the "
                 f"first batch")
    # the reference encodes the calibration texts in a side thread while gigatoken parses
    # tokenizer.json: `tokenizers` releases the GIL while encoding, gigatoken's parse holds
    # it (qwen3: ~0.3 s of the ~0.9 s build hidden)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibrate") as side:
        ref_ids = side.submit(reference.encode, calib)
        giga, problem = None, None
        try:
            giga = GigatokenEncoder(tok, split_with=reference, parallel=parallel)
        except BackendError as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 -- a young library: any load failure: "not it"
            problem = f"gigatoken could not load the tokenizer: {type(e).__name__}: {e}"
        ref_calib = ref_ids.result()   # a failing reference is not gigatoken's: it propagates
    if giga is not None:
        try:
            problem = first_mismatch(giga, reference, calib, b_ids=ref_calib)
        except Exception as e:  # noqa: BLE001 -- as above
            problem = f"gigatoken failed on the calibration texts: {type(e).__name__}: {e}"
    if problem is None and cache is not None and not cached:
        cache.record_calibration_pass(strings=len(CALIBRATION_TEXTS))   # only passes are kept
    return (giga if problem is None else None), problem, what


def first_mismatch(a: Any, b: Any, texts: list[str], *, b_ids: Ragged | None = None
                   ) -> str | None:
    """Where engine `a` and engine `b` disagree on `texts` (None if nowhere). `b_ids`: `b`'s
    ids for `texts` when already computed."""
    ra, rb = a.encode(texts), (b.encode(texts) if b_ids is None else b_ids)
    if np.array_equal(ra.offsets, rb.offsets) and np.array_equal(ra.flat, rb.flat):
        return None
    for i, text in enumerate(texts):
        x, y = ra.row(i).tolist(), rb.row(i).tolist()
        if x != y:
            return (f"text {i} {text[:60]!r}: {a.name} {x[:16]}{'...' if len(x) > 16 else ''} vs "
                    f"{b.name} {y[:16]}{'...' if len(y) > 16 else ''}")
    return "different ids"


def choose_backend(requested: str, tok: Any, *, texts: list[str], parallel: bool = True,
                   cache_dir: Any = "default") -> tuple[Any, Any, str]:
    """`(engine, reference, reason)` for `--tokenizer_backend requested`.

    auto: gigatoken if it loads and equals the reference on CALIBRATION_TEXTS + `texts` (the
    first batch's texts), else tokenizers (if it equals transformers), else transformers.
    An explicit gigatoken/tokenizers is verified the same way and fails (BackendError) instead of
    falling back: a forced engine that gives other ids would write a wrong dataset.
    A pass on CALIBRATION_TEXTS is cached per tokenizer.json content and library versions
    (encoder/verdict_cache.py; `cache_dir`: "default" = from the environment, None = off); on a
    hit only `texts` are compared. `texts` are compared on every run.
    """
    if requested not in TOKENIZER_BACKENDS:
        raise BackendError(f"--tokenizer_backend {requested}: choose one of "
                           f"{', '.join(TOKENIZER_BACKENDS)}")
    reference = reference_encoder(tok)
    if requested == "transformers":
        split = reference if reference.name == "tokenizers" else None
        return TransformersEncoder(tok, split_with=split), reference, "requested"
    why_not: list[str] = []
    if requested in ("auto", "gigatoken"):
        giga, problem, what = _calibrated_gigatoken(tok, reference, texts=texts,
                                                    parallel=parallel, cache_dir=cache_dir)
        if problem is None:
            return giga, reference, f"ids equal to {reference.name} on {what}"
        if requested == "gigatoken":
            raise BackendError(f"--tokenizer_backend gigatoken: {problem}; use "
                               f"--tokenizer_backend tokenizers")
        why_not.append(f"gigatoken not used: {problem}")
    if reference.name == "tokenizers":
        prefix = "; ".join(why_not)
        return reference, reference, (prefix + "; " if prefix else "") + (
            "requested" if requested == "tokenizers" else "tokenizers equals transformers")
    if requested == "tokenizers":
        raise BackendError("--tokenizer_backend tokenizers: this tokenizer's `tokenizers` backend "
                           "is missing or gives other ids than transformers; use "
                           "--tokenizer_backend transformers")
    why_not.append("tokenizers backend missing or different from transformers")
    return reference, reference, "; ".join(why_not)
