"""Documents (one plugin row each) -> token ids + loss masks, a batch at a time (one tokenizer call
per batch and kind). Packing documents into training samples happens later (packing.py).

`DocumentEncoder` is built from a small picklable `EncoderSpec`, so worker processes build their own
copy (tokenizer loaded once per worker) and the output does not depend on the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from encoder.backends import Ragged, choose_backend, reference_encoder
from encoder.errors import CrossCheckError, TemplateError
from encoder.templates import make_template, render
from encoder.tokenizer_policy import load_encoding_tokenizer, measure_policy
from encoder.truncation import truncate

CROSS_CHECK_EVERY = 1000   # ~0.1% of rows re-encoded with the reference (qwen3: ~+1% time)
MARKUP_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker needs to encode rows exactly like the main process."""

    tokenizer_path: str
    encode_type: str
    max_length: int
    template: str = "none"
    truncation: str = "drop"
    add_tokens: tuple[str, ...] = field(default_factory=tuple)
    tokenizer_backend: str = "auto"          # auto | gigatoken | tokenizers | transformers
    chat_template: str | None = None           # jinja text from --chat_template (template chat)
    chat_template_source: str | None = None    # its file path or "builtin:NAME", for the manifest
    cross_check_every: int = CROSS_CHECK_EVERY  # re-encode ~1 row in N with the reference; 0: off
    parallel: bool = True                     # gigatoken's own thread pool (False in workers)


def load_spec_tokenizer(spec: EncoderSpec) -> Any:
    """The tokenizer `spec` asks for (light `tokenizers` loader where equivalent, see
    encoder/json_tokenizer.py); main process and workers load it the same way."""
    return load_encoding_tokenizer(spec.tokenizer_path, add_tokens=list(spec.add_tokens),
                          backend=spec.tokenizer_backend,
                          chat_template=spec.encode_type != "pretrain" and spec.template == "chat")


class Encoded(NamedTuple):
    """One encoded row. `ids`/`mask` are None when dropped or invalid; `raw_len` is pre-truncation."""

    ids: np.ndarray | None
    mask: np.ndarray | None
    status: str          # "ok" | "truncated" | "dropped" | "invalid"
    raw_len: int
    reason: str = ""


def cross_check_sampled(row_ids: np.ndarray, every: int) -> np.ndarray:
    """Positions of rows in the deterministic ~1-in-`every` sample: a multiplicative hash of the
    row number (not `row % every`, which would follow any period in the data).

    >>> cross_check_sampled(np.arange(5), 1).tolist()
    [0, 1, 2, 3, 4]
    """
    if every <= 0:
        return np.zeros(0, dtype=np.int64)
    h = (np.asarray(row_ids, dtype=np.uint64) * np.uint64(0x9E3779B1)) % np.uint64(1 << 32)
    return np.flatnonzero(h % np.uint64(every) == 0)


@dataclass
class EncodedBatch:
    """A batch of encoded rows as flat arrays (no Python object per row until `rows()`).

    Row k's ids are `ids[offsets[k]:offsets[k+1]]` (empty for invalid rows); rows that were
    truncated or dropped are in `changed` (k -> Encoded), invalid ones in `invalid` (k -> reason).
    """

    ids: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None
    raw_lens: np.ndarray
    changed: dict = field(default_factory=dict)
    invalid: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self) -> list[Encoded]:
        cuts = self.offsets[1:-1]
        ids_rows = np.split(self.ids, cuts)
        mask_rows = np.split(self.mask, cuts) if self.mask is not None else [None] * len(ids_rows)
        raw = self.raw_lens.tolist()
        out = []
        for k, (ids, mask) in enumerate(zip(ids_rows, mask_rows)):
            if k in self.invalid:
                out.append(Encoded(None, None, "invalid", 0, self.invalid[k]))
            elif k in self.changed:
                out.append(self.changed[k])
            else:
                out.append(Encoded(ids, mask, "ok", raw[k]))
        return out


def _wrap_rows(r: Ragged, prefix: list[int], suffix: list[int]) -> Ragged:
    """`prefix + row + suffix` for every row, in numpy (pretrain: BOS? + text + EOS)."""
    p, s = len(prefix), len(suffix)
    n = len(r.offsets) - 1
    lens = r.lengths() + (p + s)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.int64)
    # token j of row i moves right by the i*(p+s) wrapper tokens before it, plus this row's prefix
    dest = np.arange(len(r.flat), dtype=np.int64) + np.repeat(
        np.arange(n, dtype=np.int64) * (p + s) + p, r.lengths())
    out[dest] = r.flat
    for k, t in enumerate(prefix):
        out[offsets[:-1] + k] = t
    for k, t in enumerate(suffix):
        out[offsets[1:] - s + k] = t
    return Ragged(out, offsets)


def special_added_ids(tok: Any) -> set[int]:
    """Ids of the added tokens `tok` marks special (tokenizer.json `added_tokens` with
    "special": true, plus tokens added with add_special_tokens): the ones HF's
    `split_special_tokens=True` splits into plain text."""
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = backend.get_added_tokens_decoder() if backend is not None \
        else getattr(tok, "added_tokens_decoder", None) or {}
    return {int(i) for i, t in decoder.items() if getattr(t, "special", False)}


def _id_table(ids: frozenset[int]) -> np.ndarray:
    """A bool lookup table over ids 0..max(ids)+1 (the last entry False: the clip target for
    larger ids), True at `ids`."""
    table = np.zeros(max(ids, default=-1) + 2, dtype=bool)
    table[list(ids)] = True
    return table


def _id_ranges(ids: frozenset[int]) -> str:
    """Ids as short text for the manifest: runs of consecutive ids as "a-b".

    >>> _id_ranges(frozenset({0, 1, 2, 7, 128000, 128001, 128002}))
    '[0-2, 7, 128000-128002]'
    """
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "[" + ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) + "]"


class DocumentEncoder:
    """Encode validated rows (str for pretrain, message lists for qa/chat).

    >>> enc = DocumentEncoder(EncoderSpec("../shared/tokenizers/llama2", "qa", 64))  # doctest: +SKIP
    >>> enc.encode_rows([[{"role": "user", "content": "Hi"},
    ...                   {"role": "assistant", "content": "Yo"}]])[0].ids      # doctest: +SKIP
    array([    1, 6324,   612, 29877,     2])
    """

    def __init__(self, spec: EncoderSpec, *, tokenizer: Any = None):
        self.spec = spec
        self.tok = tokenizer if tokenizer is not None else load_spec_tokenizer(spec)
        self.policy = measure_policy(self.tok)
        self.prefix = self.policy.doc_prefix()
        if spec.encode_type == "pretrain":
            if self.policy.eos_id is None:
                raise TemplateError(f"tokenizer {spec.tokenizer_path} has no eos_token; pretrain "
                                    f"documents need one to mark their end")
            self.template = None
            self.end_ids = [self.policy.eos_id]
        else:
            self.template = make_template(spec.template, tokenizer=self.tok,
                                          eos_id=self.policy.eos_id,
                                          chat_template=spec.chat_template,
                                          chat_template_source=spec.chat_template_source)
            self.end_ids = list(self.template.end_ids)
        self.control_ids = self._control_ids()
        self._control_table = _id_table(self.control_ids)
        self.engine: Any = None        # chosen by select_backend (or use_backend in workers)
        self.reference: Any = None
        self.backend_reason = ""
        self.cross_checked = 0
        self._markup_cache: dict[str, np.ndarray] = {}
        self._pairs = None
        if spec.encode_type == "preference":  # each side encoded as chat (encoder/preference.py)
            from encoder.preference import PairEncoder
            self._pairs = PairEncoder(self)
        elif spec.encode_type == "kto":  # one chat sequence per example, plus its label
            from encoder.preference import UnpairedEncoder
            self._pairs = UnpairedEncoder(self)

    def _control_ids(self) -> frozenset[int]:
        """Ids that data text must never produce: BOS, EOS, pad, unk, the template's markers and
        every added token the tokenizer marks special (llama3: its 256 `<|...|>` tokens incl. the
        reserved ones; qwen3: `<|im_start|>`, `<|endoftext|>`, ...; --add_tokens, which are added
        as special). Non-special added tokens (qwen3's `<tool_call>`, `<think>`) are not control
        tokens: chat templates write them inside message content and HF parses them as one token,
        so data text keeps them."""
        tok = self.tok
        ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id,
               *self.end_ids, *getattr(self.template, "start_ids", []),
               *getattr(self.template, "control_ids", []), *special_added_ids(tok)}
        ids.discard(None)
        return frozenset(ids)

    # -- backend ----------------------------------------------------------------------------------
    def select_backend(self, rows: list[Any]) -> str:
        """Choose the engine (`--tokenizer_backend`), calibrating on `rows` (the first batch).
        Returns the engine's name; `backend_reason` says why."""
        seg_rows, _ = self._segments(rows)
        texts = [v for segs in seg_rows for kind, v, _ in segs if kind != "ids"]
        self.engine, self.reference, self.backend_reason = choose_backend(
            self.spec.tokenizer_backend, self.tok, texts=texts, parallel=self.spec.parallel)
        self._markup_cache.clear()
        return self.engine.name

    def use_backend(self, name: str) -> None:
        """Use engine `name` as already chosen and verified by the main process (workers)."""
        self.engine, self.reference, self.backend_reason = choose_backend(
            name, self.tok, texts=[], parallel=self.spec.parallel)
        self._markup_cache.clear()

    def backend_info(self) -> dict:
        """For stats.json and the manifest: which engine, why, and the cross-check."""
        checking = self.engine is not None and self.engine is not self.reference
        return {"name": self.engine.name if self.engine else None, "reason": self.backend_reason,
                "reference": self.reference.name if self.reference else None,
                "cross_check": (f"1 in {self.spec.cross_check_every} rows re-encoded with "
                                f"{self.reference.name}" if checking and self.spec.cross_check_every
                                else "off (the engine is the reference)" if not checking
                                else "off")}

    # -- public -----------------------------------------------------------------------------------
    def encode_rows(self, rows: list[Any]) -> list[Encoded]:
        """Encode a batch; the result has one `Encoded` per row, in order."""
        return self.encode_batch(rows).rows()

    def encode_batch(self, rows: list[Any], row_ids: Any = None) -> EncodedBatch:
        """Encode a batch into flat arrays. `row_ids` (the plugin's row numbers; default the
        positions) choose the cross-checked sample and name a failing row."""
        if self._pairs is not None:
            return self._pairs.encode_batch(rows, row_ids)
        if self.engine is None:
            self.select_backend(rows)
        seg_rows, invalid = self._segments(rows)
        raw, mask = self._assemble(seg_rows, self.engine)
        self._cross_check(seg_rows, invalid, raw, mask, row_ids)
        lens = raw.lengths()
        changed: dict = {}
        if self.template is not None:
            for k in np.flatnonzero(lens > self.spec.max_length).tolist():
                if k in invalid:
                    continue
                ids, m = raw.row(k), mask[raw.offsets[k]:raw.offsets[k + 1]]
                t_ids, t_mask, status = truncate(ids, m, max_length=self.spec.max_length,
                                                 mode=self.spec.truncation,
                                                 keep_prefix=len(self.prefix))
                changed[k] = Encoded(t_ids, t_mask, status, len(ids))
        return EncodedBatch(raw.flat, raw.offsets, mask, lens, changed, invalid)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of the prompt for generating the next assistant turn, exactly as the encoder
        lays out a training sample up to the first trained token (same template, same BOS
        policy, same per-piece tokenization). Used by `trainer.generate`.

        >>> enc.encode_prompt([{"role": "user", "content": "Hi"}])          # doctest: +SKIP
        [1, 6324]
        """
        if self.template is None:
            raise TemplateError("pretrain datasets have no prompt format; pass raw text instead")
        engine = self.engine or reference_encoder(self.tok)   # one prompt: exactness, not speed
        if hasattr(self.template, "prompt_segments"):   # chat templates render the prompt itself
            raw, _ = self._assemble([self.template.prompt_segments(messages)], engine)
            return raw.row(0).tolist()
        # Render with a placeholder answer, then keep every segment up to the last untrained
        # one: the history plus the generation prompt.
        placeholder = [{"role": "assistant", "content": "Placeholder answer."}]
        segs = render(self.template, list(messages) + placeholder)
        last_prompt = max((k for k, seg in enumerate(segs) if not seg[2]), default=-1)
        prompt_segs = segs[:last_prompt + 1]
        raw, _ = self._assemble([prompt_segs], engine)
        return raw.row(0).tolist()

    # -- steps ------------------------------------------------------------------------------------
    def _segments(self, rows: list[Any]) -> tuple[list[list], dict[int, str]]:
        """Each row's segments (see templates.py); rows the template rejects -> `invalid`."""
        if self.template is None:
            return [[("text", row, True), ("ids", self.end_ids, True)] for row in rows], {}
        seg_rows, invalid = [], {}
        for k, row in enumerate(rows):
            try:
                seg_rows.append(render(self.template, row))
            except TemplateError as e:
                seg_rows.append([])
                invalid[k] = str(e)
        return seg_rows, invalid

    def _assemble(self, seg_rows: list[list], engine: Any) -> tuple[Ragged, np.ndarray | None]:
        """Rows' segments -> (ids as Ragged, loss mask flat or None for pretrain). All data
        texts of the batch go through one engine call, all template markup through one more
        (cached), and the rows are gathered from those flat arrays with numpy offsets."""
        if self.template is None:   # pretrain: [prefix] + text + EOS, every token trained
            texts = [segs[0][1] for segs in seg_rows]
            return _wrap_rows(self._encode_texts(texts, engine, guard=True), self.prefix,
                              self.end_ids), None
        texts, markups, literals = [], [], [list(self.prefix)]
        kinds, index, trained, pieces_per_row = [], [], [], []
        for segs in seg_rows:
            n0 = len(kinds)
            if segs:
                kinds.append(2), index.append(0), trained.append(False)   # the BOS prefix
            for kind, value, flag in segs:
                if kind == "text":
                    kinds.append(0), index.append(len(texts))
                    texts.append(value)
                elif kind == "markup":
                    kinds.append(1), index.append(len(markups))
                    markups.append(value)
                else:
                    kinds.append(2), index.append(len(literals))
                    literals.append(value)
                trained.append(flag)
            pieces_per_row.append(len(kinds) - n0)
        parts = [self._encode_texts(texts, engine, guard=True),
                 self._encode_markup(markups, engine), Ragged.from_lists(literals)]
        source = np.concatenate([p.flat for p in parts])
        bases = np.cumsum([0] + [len(p.flat) for p in parts[:-1]])
        kinds_a, index_a = np.array(kinds, dtype=np.int64), np.array(index, dtype=np.int64)
        start = np.zeros(len(kinds), dtype=np.int64)
        length = np.zeros(len(kinds), dtype=np.int64)
        for k, part in enumerate(parts):
            sel = kinds_a == k
            start[sel] = bases[k] + part.offsets[index_a[sel]]
            length[sel] = part.lengths()[index_a[sel]]
        out_off = np.zeros(len(kinds) + 1, dtype=np.int64)
        np.cumsum(length, out=out_off[1:])
        gather = np.repeat(start - out_off[:-1], length) + np.arange(out_off[-1], dtype=np.int64)
        ids = source[gather]
        mask = np.repeat(np.array(trained, dtype=bool), length)
        row_pieces = np.zeros(len(seg_rows) + 1, dtype=np.int64)
        np.cumsum(pieces_per_row, out=row_pieces[1:])
        return Ragged(ids, out_off[row_pieces]), mask

    def _encode_texts(self, texts: list[str], engine: Any, *, guard: bool) -> Ragged:
        """One engine call, add_special_tokens=False. With `guard`, a text that would yield a
        control token (e.g. a literal "</s>" in HTML, "<|eot_id|>" in a chat log) is re-encoded
        with special tokens split (every special added token becomes plain text, as HF's
        split_special_tokens=True), so data can never inject BOS/EOS/end-of-turn/any special
        token."""
        r = engine.encode(texts) if texts else Ragged.from_lists([])
        if guard and len(r.flat) and len(self.control_ids):
            # one table lookup per token (< 1 ms per 1M tokens, bench/special_token_guard.py);
            # ids past the table clip onto its last entry, which is False
            hits = np.flatnonzero(self._control_table.take(r.flat, mode="clip"))
            if len(hits):
                bad = np.unique(np.searchsorted(r.offsets, hits, side="right") - 1).tolist()
                split = engine.encode_split([texts[k] for k in bad])
                r = r.replace_rows(dict(zip(bad, split)))
        return r

    def _encode_markup(self, markups: list[str], engine: Any) -> Ragged:
        """Template markup (chat-template glue such as "<|im_start|>user\n") repeats across rows:
        each distinct string is tokenized once per run (cache bounded at 100k strings)."""
        if not markups:
            return Ragged.from_lists([])
        cache = self._markup_cache if engine is self.engine else {}
        missing = [m for m in dict.fromkeys(markups) if m not in cache]
        if missing:
            if len(cache) + len(missing) > MARKUP_CACHE_SIZE:
                cache.clear()
            new = engine.encode(missing)
            for m, k in zip(missing, range(len(missing))):
                cache[m] = new.row(k)
        arrays = [cache[m] for m in markups]
        lens = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        return Ragged(np.concatenate(arrays).astype(np.int64, copy=False), offsets)

    def _cross_check(self, seg_rows: list[list], invalid: dict, raw: Ragged,
                     mask: np.ndarray | None, row_ids: Any) -> None:
        """Re-encode the sampled rows with the reference; stop on any difference."""
        every = self.spec.cross_check_every
        if not every or self.engine is self.reference:
            return
        ids = np.arange(len(seg_rows)) if row_ids is None else np.asarray(row_ids)
        picked = [k for k in cross_check_sampled(ids, every).tolist() if k not in invalid]
        if not picked:
            return
        ref, _ = self._assemble([seg_rows[k] for k in picked], self.reference)
        for j, k in enumerate(picked):
            mine, theirs = raw.row(k), ref.row(j)
            if not np.array_equal(mine, theirs):
                raise CrossCheckError(int(ids[k]), self.engine.name, mine.tolist(),
                                      self.reference.name, theirs.tolist())
        self.cross_checked += len(picked)

    def describe(self) -> dict:
        """The special-token policy and template, for the manifest metadata."""
        tok = self.tok
        pol = self.policy
        return {
            "bos": {"id": pol.bos_id, "token": tok.bos_token,
                    "policy": "once at the start of every document" if pol.adds_bos
                    else "never (the tokenizer's convention adds none)"},
            "eos": {"id": pol.eos_id, "token": tok.eos_token},
            "end_of_turn_ids": self.end_ids,
            "end_of_turn_tokens": tok.convert_ids_to_tokens(self.end_ids),
            "tokenizer_adds_eos": pol.adds_eos,
            "pad_stored": False,
            "text_encoding": "each prompt/answer piece encoded separately with "
                             "add_special_tokens=False; data text never yields control tokens "
                             f"{_id_ranges(self.control_ids)} (BOS/EOS/pad/unk, template markers, "
                             "every special added token; re-encoded with special tokens split)",
            "loss": "answers (assistant contents) + their end-of-turn token" if self.template
                    else "all tokens",
            "template": self.template.describe() if self.template else None,
        }
