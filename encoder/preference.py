"""`--encode_type preference`: (prompt, chosen, rejected) rows -> pair samples.

Row shapes a plugin may yield:
    {"prompt": str, "chosen": str, "rejected": str, "system": str (optional)}
    {"messages": [... ending with a user turn], "chosen": <assistant message | list | str>,
     "rejected": <same>}                      (the chat form; a "system" key is also accepted)

Each side is the whole conversation prompt + response, rendered by the same template and encoded by
the same code as a qa/chat row (encoder/document_encoder.py), so a chosen sequence has exactly the
tokens and loss mask the qa/chat encoder gives that conversation. Both sides share the prompt.

Truncation treats a pair as a unit (--max_length bounds each sequence, as for qa/chat):
  drop         the pair is dropped if either sequence is longer than max_length;
  right        each sequence keeps its first max_length tokens;
  prompt_left  the same number of tokens is removed from the start of both prompts (they stay
               identical), enough for the longer sequence to fit; dropped if a response alone
               does not fit.
If either side ends with no trained token, the pair is dropped. Truncated and dropped pairs are
counted once each. Layout on disk: shardfmt/preference.py (chosen, rejected as two document
segments of one sample; --merge_data packs whole pairs).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from encoder.truncation import truncate

PAIR_KEYS = ("chosen", "rejected")


class PairRow(list):
    """A validated pair: the chosen conversation's messages followed by the rejected one's (a list,
    so generic code that sums message lengths works), split at `n_chosen`."""

    def __init__(self, chosen: list[dict], rejected: list[dict], responses: tuple[int, int]):
        super().__init__(chosen + rejected)
        self.n_chosen = len(chosen)
        self.responses = tuple(responses)  # assistant messages of the response, per side

    @property
    def chosen(self) -> list[dict]:
        return list(self[:self.n_chosen])

    @property
    def rejected(self) -> list[dict]:
        return list(self[self.n_chosen:])

    def __reduce__(self):  # worker processes: rebuild from the two halves
        return (PairRow, (self.chosen, self.rejected, self.responses))


class PairEncoded(NamedTuple):
    """One encoded pair; `ids`/`mask` are chosen + rejected back to back, split at `chosen_len`.
    Same first fields as `Encoded`, so the encoder's counting stages take either."""

    ids: np.ndarray | None
    mask: np.ndarray | None
    status: str          # "ok" | "truncated" | "dropped" | "invalid"
    raw_len: int         # the longer side before truncation
    reason: str = ""
    chosen_len: int = 0

    def sides(self) -> list[tuple[np.ndarray, np.ndarray]]:
        c = self.chosen_len
        return [(self.ids[:c], self.mask[:c]), (self.ids[c:], self.mask[c:])]


# -- row validation ------------------------------------------------------------------------------
def _prompt_turns(row: dict, *, messages_are: str) -> list:
    """The conversation before the response(s): 'prompt' (str) as one user turn, or a copy of
    'messages'; an optional 'system' goes first unless the turns already start with one."""
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"'prompt' must be str, got {type(row['prompt']).__name__}")
        prompt = [{"role": "user", "content": row["prompt"]}]
    else:
        prompt = row["messages"]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("'messages' must be a non-empty list of {'role', 'content'} dicts "
                             f"({messages_are})")
        prompt = list(prompt)
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"'system' must be str, got {type(system).__name__}")
        if system and not (isinstance(prompt[0], dict) and prompt[0].get("role") == "system"):
            prompt = [{"role": "system", "content": system}] + prompt
    return prompt


def check_preference_row(row: Any, *, chat_messages) -> PairRow:
    """Validate a preference row and build both conversations (checked like chat rows by
    `chat_messages`, the chat validator). Raises ValueError naming the key."""
    if not isinstance(row, dict):
        raise ValueError(f"preference rows must be dicts, got {type(row).__name__}")
    missing = [k for k in PAIR_KEYS if k not in row]
    if missing or ("prompt" not in row and "messages" not in row):
        need = [k for k in ("prompt",) if "prompt" not in row and "messages" not in row] + missing
        raise ValueError(f"preference row lacks {need} (got keys {sorted(row)}); expected "
                         f"{{'prompt', 'chosen', 'rejected'[, 'system']}} or "
                         f"{{'messages', 'chosen', 'rejected'}}")
    prompt = _prompt_turns(row, messages_are="the prompt turns, ending with a user turn")
    sides, responses = [], []
    for key in PAIR_KEYS:
        response = _response_messages(row[key], key)
        try:
            sides.append(chat_messages({"messages": prompt + response}))
        except ValueError as e:
            raise ValueError(f"{key!r} conversation: {e}") from None
        responses.append(sum(m.get("role") == "assistant" for m in response))
    return PairRow(*sides, responses=tuple(responses))


def _response_messages(value: Any, key: str) -> list[dict]:
    """`"text"`, `{"role": "assistant", "content": ...}` (or ShareGPT `{"from": "gpt", "value"}`),
    or a list of such messages -> a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{key!r} is an empty list")
    out = []
    for m in items:
        if not isinstance(m, dict):
            raise ValueError(f"{key!r} must be a str, an assistant message dict or a list of "
                             f"them, got {type(m).__name__}")
        if "from" in m and "role" not in m:  # ShareGPT spelling
            role = {"gpt": "assistant", "human": "user"}.get(m["from"], m["from"])
            m = {"role": role, "content": m.get("value")}
        out.append(m)
    return out


# -- encoding ------------------------------------------------------------------------------------
class _ChatRowsEncoder:
    """Rows encoded by an inner qa/chat `DocumentEncoder` (same tokenizer, same template, same
    engine as the outer encoder's, no truncation); subclasses truncate what it returns."""

    def __init__(self, outer: Any):
        from encoder.document_encoder import DocumentEncoder
        self.max_length = outer.spec.max_length
        self.mode = outer.spec.truncation
        self.keep_prefix = len(outer.prefix)
        inner_spec = replace(outer.spec, encode_type="chat", max_length=1 << 62)
        self.inner = DocumentEncoder(inner_spec, tokenizer=outer.tok)
        self.outer = outer

    def encode_batch(self, rows: list, row_ids: Any = None) -> "PairBatch":
        """The encoder pipeline's call (each subclass's encode_rows). `row_ids`: the plugin's
        row numbers (default the positions), which choose the cross-checked sample and name a
        failing row."""
        return PairBatch(self.encode_rows(rows, row_ids))

    def _encode_chats(self, chats: list, row_ids: Any) -> list:
        """`chats[j]` belongs to plugin row `row_ids[j]` (a pair's two sides share theirs, so
        both are cross-checked together and an error names the plugin row)."""
        if self.inner.engine is None and self.outer.engine is not None:
            self.inner.engine, self.inner.reference = self.outer.engine, self.outer.reference
            self.inner.backend_reason = self.outer.backend_reason
        return self.inner.encode_batch(chats, row_ids).rows()


class PairEncoder(_ChatRowsEncoder):
    """Encodes `PairRow`s (both sides by the inner chat encoder), then truncates each pair as a
    unit."""

    def encode_rows(self, rows: list[PairRow], row_ids: Any = None) -> list[PairEncoded]:
        ids = np.arange(len(rows)) if row_ids is None else np.asarray(row_ids)
        encoded = self._encode_chats([half for row in rows for half in (row.chosen, row.rejected)],
                                     np.repeat(ids, 2))
        return [self._pair(encoded[2 * k], encoded[2 * k + 1], row.responses)
                for k, row in enumerate(rows)]

    def _pair(self, c: Any, r: Any, responses: tuple[int, int]) -> PairEncoded:
        raw = max(c.raw_len, r.raw_len)
        for side, enc in (("chosen", c), ("rejected", r)):
            if enc.status == "invalid":
                return PairEncoded(None, None, "invalid", raw, f"{side}: {enc.reason}")
        masks = []
        for side, enc, k in (("chosen", c, responses[0]), ("rejected", r, responses[1])):
            mask = response_only(enc.mask, k)
            if mask is None:
                return PairEncoded(None, None, "invalid", raw, f"{side}: the template's loss "
                                   f"spans cannot be matched to the {k} response message(s)")
            masks.append(mask)
        c, r = c._replace(mask=masks[0]), r._replace(mask=masks[1])
        sides, status = truncate_pair((c.ids, c.mask), (r.ids, r.mask), max_length=self.max_length,
                                      mode=self.mode, keep_prefix=self.keep_prefix)
        if sides is None:
            return PairEncoded(None, None, "dropped", raw)
        (ci, cm), (ri, rm) = sides
        return PairEncoded(np.concatenate([ci, ri]), np.concatenate([cm, rm]), status, raw,
                           chosen_len=len(ci))


class PairBatch:
    """A batch of encoded pairs, shaped like `EncodedBatch` for the pipeline's stages."""

    def __init__(self, pairs: list[PairEncoded]):
        self.pairs = pairs
        self.raw_lens = np.array([p.raw_len for p in pairs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self) -> list[PairEncoded]:
        return self.pairs


def response_only(mask: np.ndarray, k: int) -> np.ndarray | None:
    """Keep the last `k` trained runs of a chat mask (the response's assistant turns); earlier
    assistant turns belong to the shared prompt and are not trained (as in TRL and LLaMA-Factory).
    None if the mask has fewer than `k` runs.

    >>> response_only(np.array([0, 1, 1, 0, 1, 0, 1], bool), 1).astype(int).tolist()
    [0, 0, 0, 0, 0, 0, 1]
    """
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    starts = edges[0::2]
    if len(starts) < k or k < 1:
        return None
    out = mask.copy()
    out[:starts[-k]] = False
    return out


def truncate_pair(chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray], *,
                  max_length: int, mode: str, keep_prefix: int):
    """((chosen, rejected) or None, status) with status "ok" | "truncated" | "dropped".

    >>> ids = np.arange(6); m = np.array([0, 0, 0, 1, 1, 1], bool)
    >>> truncate_pair((ids, m), (ids[:5], m[:5]), max_length=5, mode="prompt_left",
    ...               keep_prefix=1)[0][1][0].tolist()
    [0, 2, 3, 4]
    """
    longest = max(len(chosen[0]), len(rejected[0]))
    if longest <= max_length:
        return (chosen, rejected), "ok"
    if mode == "prompt_left":  # cut both prompts by the same amount: they must stay identical
        excess = longest - max_length
        out = []
        for ids, mask in (chosen, rejected):
            first_loss = int(np.argmax(mask)) if mask.any() else len(mask)
            if excess > first_loss - keep_prefix:
                return None, "dropped"
            keep = np.r_[0:keep_prefix, keep_prefix + excess:len(ids)]
            out.append((ids[keep], mask[keep]))
        return tuple(out), "truncated"
    out = []
    for ids, mask in (chosen, rejected):
        t_ids, t_mask, status = truncate(ids, mask, max_length=max_length, mode=mode,
                                         keep_prefix=keep_prefix)
        if status == "dropped":
            return None, "dropped"
        out.append((t_ids, t_mask))
    return tuple(out), "truncated"


# -- samples -------------------------------------------------------------------------------------
def pair_samples(pairs: Iterable[PairEncoded], *, max_length: int, merge_data: bool,
                 pack_window: int) -> Iterator[tuple[list, bool]]:
    """Encoded pairs -> samples of whole pairs: one pair each, or packed (best-fit-decreasing over
    pair lengths into 2 * max_length, the most two sequences of max_length can take)."""
    if not merge_data:
        for p in pairs:
            yield p.sides(), False
        return
    from encoder.packing import best_fit_decreasing, drain_sparsest
    capacity = 2 * max_length
    buf: list[PairEncoded] = []

    def flush() -> Iterator[tuple[list, bool]]:
        lengths = [len(p.ids) for p in buf]
        bins = drain_sparsest(best_fit_decreasing(lengths, capacity=capacity), lengths,
                              capacity=capacity)
        for b in bins:
            yield [side for k in b for side in buf[k].sides()], False

    for p in pairs:
        buf.append(p)
        if len(buf) >= pack_window:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


# -- unpaired feedback (KTO): --encode_type kto ---------------------------------------------------
# Row shapes a plugin may yield:
#     {"prompt": str, "completion": str | assistant message | list, "label": bool[, "system": str]}
#     {"messages": [... ending with the assistant completion], "label": bool}   (the chat form: the
#         last assistant message is the completion; earlier assistant turns belong to the prompt)
#     {"messages": [... ending with a user turn], "completion": ..., "label": bool}
# Each example is ONE sequence (prompt + completion), rendered and encoded exactly as the qa/chat
# encoder renders that conversation; only the completion's tokens carry the loss mask. The label
# (True = desirable) goes to the dataset as a per-segment flag (shardfmt/preference.py).
class UnpairedRow(list):
    """A validated unpaired example: its messages (a list), the completion's assistant-message count
    `responses` and the boolean `desirable` label."""

    def __init__(self, messages: list[dict], *, desirable: bool, responses: int):
        super().__init__(messages)
        self.desirable = bool(desirable)
        self.responses = int(responses)

    def __reduce__(self):  # worker processes
        return (_unpaired_row, (list(self), self.desirable, self.responses))


def _unpaired_row(messages: list[dict], desirable: bool, responses: int) -> "UnpairedRow":
    return UnpairedRow(messages, desirable=desirable, responses=responses)


class UnpairedEncoded(NamedTuple):
    """One encoded unpaired example; same first fields as `Encoded`."""

    ids: np.ndarray | None
    mask: np.ndarray | None
    status: str          # "ok" | "truncated" | "dropped" | "invalid"
    raw_len: int
    reason: str = ""
    desirable: bool = True


KTO_ROW_HELP = ("expected {'prompt', 'completion', 'label'[, 'system']} or {'messages' (ending with "
                "the assistant completion), 'label'}, with 'label' a JSON boolean: true = desirable, "
                "false = undesirable")


def check_unpaired_row(row: Any, *, chat_messages) -> UnpairedRow:
    """Validate an unpaired (KTO) row and build its conversation (checked like a chat row by
    `chat_messages`). Raises ValueError naming the key and the fix."""
    if not isinstance(row, dict):
        raise ValueError(f"kto rows must be dicts, got {type(row).__name__}; {KTO_ROW_HELP}")
    if "label" not in row:
        raise ValueError(f"kto row lacks 'label' (got keys {sorted(row)}); {KTO_ROW_HELP}")
    label = row["label"]
    if not isinstance(label, (bool, np.bool_)):
        raise ValueError(f"'label' must be a boolean (true = desirable, false = undesirable), got "
                         f"{type(label).__name__} {label!r}; convert it in the plugin (e.g. "
                         f"label = (rating >= 4)) rather than relying on truthiness")
    if "prompt" not in row and "messages" not in row:
        raise ValueError(f"kto row lacks 'prompt' or 'messages' (got keys {sorted(row)}); "
                         f"{KTO_ROW_HELP}")
    if "prompt" in row and "completion" not in row:
        raise ValueError(f"kto row with 'prompt' lacks 'completion'; {KTO_ROW_HELP}")
    prompt = _prompt_turns(row, messages_are="the conversation")
    if "completion" in row:
        completion = _response_messages(row["completion"], "completion")
    else:  # chat form: the trailing assistant message(s) are the completion
        last = prompt[-1]
        if not (isinstance(last, dict) and last.get("role", last.get("from")) in
                ("assistant", "gpt")):
            raise ValueError("'messages' must end with the assistant completion (or give it as "
                             "'completion'); the last message has role "
                             f"{last.get('role', last.get('from')) if isinstance(last, dict) else last!r}")
        completion = _response_messages(last, "messages[-1]")
        prompt = prompt[:-1]
        if not prompt:
            raise ValueError("'messages' holds only the completion; the prompt turns are missing")
    messages = chat_messages({"messages": prompt + completion})
    return UnpairedRow(messages, desirable=bool(label),
                       responses=sum(m.get("role") == "assistant" for m in completion))


class UnpairedEncoder(_ChatRowsEncoder):
    """Encodes `UnpairedRow`s (by the inner chat encoder), keeps the completion's loss spans only,
    then truncates like qa/chat."""

    def encode_rows(self, rows: list[UnpairedRow], row_ids: Any = None) -> list[UnpairedEncoded]:
        encoded = self._encode_chats([list(r) for r in rows], row_ids)
        return [self._one(enc, row) for enc, row in zip(encoded, rows)]

    def _one(self, enc: Any, row: UnpairedRow) -> UnpairedEncoded:
        if enc.status == "invalid":
            return UnpairedEncoded(None, None, "invalid", enc.raw_len, enc.reason, row.desirable)
        mask = response_only(enc.mask, row.responses)
        if mask is None:
            return UnpairedEncoded(None, None, "invalid", enc.raw_len,
                                   f"the template's loss spans cannot be matched to the "
                                   f"{row.responses} completion message(s)", row.desirable)
        ids, mask, status = truncate(enc.ids, mask, max_length=self.max_length, mode=self.mode,
                                     keep_prefix=self.keep_prefix)
        if status == "dropped":
            return UnpairedEncoded(None, None, "dropped", enc.raw_len, "", row.desirable)
        return UnpairedEncoded(ids, mask, status, enc.raw_len, "", row.desirable)


def unpaired_samples(examples: Iterable[UnpairedEncoded], *, max_length: int, merge_data: bool,
                     pack_window: int) -> Iterator[tuple[list, bool, list[bool]]]:
    """Encoded examples -> (segments, continues, desirable per segment): one example per sample,
    or packed whole (best-fit-decreasing into max_length, as qa/chat packing)."""
    if not merge_data:
        for e in examples:
            yield [(e.ids, e.mask)], False, [e.desirable]
        return
    from encoder.packing import best_fit_decreasing, drain_sparsest
    buf: list[UnpairedEncoded] = []

    def flush() -> Iterator[tuple[list, bool, list[bool]]]:
        lengths = [len(e.ids) for e in buf]
        bins = drain_sparsest(best_fit_decreasing(lengths, capacity=max_length), lengths,
                              capacity=max_length)
        for b in bins:
            yield [(buf[k].ids, buf[k].mask) for k in b], False, [buf[k].desirable for k in b]

    for e in examples:
        buf.append(e)
        if len(buf) >= pack_window:
            yield from flush()
            buf = []
    if buf:
        yield from flush()
