"""`--template chat`: rows rendered by the chat template itself, loss spans found by prefix diffs.

The text of a sample is exactly `tokenizer.apply_chat_template(messages, tools=tools,
tokenize=False)` (the tokenizer's own template, or `--chat_template FILE|chatml_tools`); tool calls,
tool responses, the tools block and reasoning appear wherever that template puts them.

Trained spans (one per assistant message k), located without searching for any message text:
  start  the end of the generation prompt: the longest common prefix of the full render and
         render(messages[:k], add_generation_prompt=True), snapped back to a token boundary of that
         prompt. Whatever the template makes the model produce after its generation prompt (Qwen3:
         "\\n</think>\\n\\n" after "<think>\\n") is trained. The history render(messages[:k]) must
         be a prefix of the full render, else the row is refused (the template rewrites earlier
         turns once later ones follow, e.g. drops their reasoning) rather than trained on a guess.
  end    the template's end-of-turn token (probed once: the special token the template writes
         after an answer and after a tool call), the first one after the start. Data text cannot
         fake it: special-token strings inside data are masked with private-use placeholders
         while rendering and tokenized as plain text (the same guard as the other templates).
Not trained: system, user, tool responses, the tools block, the generation prompt and whatever
text the template puts between turns. The text after the last turn (Qwen: "\\n") is kept
(untrained), so the decoded sample equals the template's rendering byte for byte.

Each piece between cut points is tokenized separately (no BPE merge across a loss boundary), and
`trainer.generate` builds prompts from the same pieces (`prompt_segments`).

Cost: 2 extra renders per assistant turn (history and generation prompt); see encoder/README.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from encoder.conversation import REASONING_KEYS, tools_of
from encoder.errors import InputNotFoundError, TemplateError
from encoder.templates import Segment, merge_segments

BUILTIN_CHAT_TEMPLATES = {"chatml_tools": Path(__file__).with_name("chat_templates") / "chatml_tools.jinja"}
PLACEHOLDER_OPEN, PLACEHOLDER_CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{PLACEHOLDER_OPEN}(\\d+){PLACEHOLDER_CLOSE}")
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool", "description": "Probe.",
                                                "parameters": {"type": "object", "properties": {}}}}


def resolve_chat_template(value: str | None) -> tuple[str | None, str | None]:
    """`--chat_template` -> (template text, source label); (None, None) when not given.

    >>> resolve_chat_template("chatml_tools")[1]
    'builtin:chatml_tools'
    """
    if value is None:
        return None, None
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value].read_text(encoding="utf-8"), f"builtin:{value}"
    path = Path(value)
    if not path.is_file():
        raise InputNotFoundError(f"--chat_template {value}: no such file, and not a built-in "
                                 f"name (built-in: {', '.join(BUILTIN_CHAT_TEMPLATES)})")
    return path.read_text(encoding="utf-8"), str(path)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b`.

    >>> common_prefix_len("abcd", "abxd")
    2
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n            # binary search on slice equality: C-speed compares, O(log n) of them
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChatTemplate:
    """The tokenizer's (or a given) jinja chat template as an encoder template (`--template chat`)."""

    name = "chat"
    supports_tools = True

    def __init__(self, *, tokenizer: Any, chat_template: str | None = None,
                 source: str | None = None, strip_bos: bool | None = None):
        self.tok = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self.source = source or ("tokenizer" if self.template else None)
        if not self.template:
            raise TemplateError(f"--template chat: tokenizer {tokenizer.name_or_path} has no "
                                f"chat_template; pass --chat_template FILE (a jinja chat template), "
                                f"or --chat_template chatml_tools (built-in ChatML with tool calls; "
                                f"needs --add_tokens '<|im_start|>' '<|im_end|>'), or choose "
                                f"--template alpaca/chatml/llama2/none")
        if strip_bos is None:   # drop the template's BOS string only where the encoder adds BOS
            from encoder.tokenizer_policy import measure_policy
            strip_bos = measure_policy(tokenizer).adds_bos
        self.bos = tokenizer.bos_token if strip_bos and tokenizer.bos_token else ""
        self.specials = sorted(_special_strings(tokenizer), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self.specials))) if self.specials \
            else None
        self._boundaries: dict[str, list[int]] = {}
        self.features = self._probe_features()
        self.end_tokens = self._probe_end_tokens()
        self.end_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in self.end_tokens]
        # data text ("text" segments) that would produce any of these is encoded with special
        # tokens split, so a literal "<|im_start|>" in a message stays plain text
        self.control_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in self.specials]
        self._end_re = re.compile("|".join(map(re.escape, self.end_tokens)))

    # -- rendering --------------------------------------------------------------------------------
    def render(self, messages: list[dict], tools: list[dict] | None, *,
               generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(list(messages), tools=tools or None,
                                                chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:   # jinja raise_exception(...) or a template bug: name it
            raise TemplateError(f"the chat template ({self.source}) failed on this conversation: "
                                f"{type(e).__name__}: {e}") from None

    def segments(self, messages: list[dict]) -> list[Segment]:
        """Training sample: the full render, assistant turns trained."""
        tools = tools_of(messages)
        self._check_features(messages, tools)
        msgs, tools, literals = self._escape(messages, tools)
        text = self.render(msgs, tools)
        spans = self.turn_spans(msgs, tools, text)
        if not spans:
            raise TemplateError("no assistant message: nothing to train")
        out = self._emit(text, spans, literals)
        if literals:
            self._check_escape(messages, out)
        return out

    def prompt_segments(self, messages: list[dict]) -> list[Segment]:
        """Inference prompt: render(messages, add_generation_prompt=True), cut like training."""
        tools = tools_of(messages)
        self._check_features(messages, tools)
        msgs, tools, literals = self._escape(messages, tools)
        text = self.render(msgs, tools, generation_prompt=True)
        return self._emit(text, self.turn_spans(msgs, tools, text), literals)

    def turn_spans(self, msgs: list[dict], tools: list[dict] | None,
                   text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of every assistant turn in `text` (see module doc)."""
        spans: list[tuple[int, int]] = []
        prev_end = 0
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            history = self.render(msgs[:k], tools) if k else ""
            if not text.startswith(history):
                raise TemplateError(
                    f"message {k}: the chat template renders the turns before this one "
                    f"differently once later turns follow (e.g. it drops earlier reasoning), so "
                    f"this turn cannot be aligned with the prompt the model sees; split the row "
                    f"into one row per assistant turn, or use another --chat_template")
            gen = self.render(msgs[:k], tools, generation_prompt=True) if k else ""
            if not gen.startswith(history):
                raise TemplateError(f"message {k}: the generation prompt does not extend the "
                                    f"history render; cannot locate the assistant turn")
            start = self._snap(gen, len(history), common_prefix_len(text, gen))
            if start < prev_end:
                raise TemplateError(f"message {k}: assistant turn starts inside the previous one")
            found = self._end_re.search(text, start)
            if found is None:
                raise TemplateError(f"message {k}: no end-of-turn token {self.end_tokens} after "
                                    f"the assistant turn")
            spans.append((start, found.end()))
            prev_end = found.end()
        return spans

    # -- helpers ----------------------------------------------------------------------------------
    def _snap(self, gen: str, lo: int, cut: int) -> int:
        """The last token boundary of the generation prompt gen[lo:] at or before `cut`."""
        tail = gen[lo:]
        bounds = self._boundaries.get(tail)
        if bounds is None:
            enc = self.tok(tail, add_special_tokens=False, return_offsets_mapping=True)
            bounds = sorted({0, len(tail), *(e for _, e in enc["offset_mapping"])})
            self._boundaries[tail] = bounds
        return lo + max(b for b in bounds if b <= cut - lo)

    def _emit(self, text: str, spans: list[tuple[int, int]], literals: list[str]) -> list[Segment]:
        pos = len(self.bos) if self.bos and text.startswith(self.bos) else 0
        out: list[Segment] = []
        for start, end in spans:
            out += _pieces(text[pos:start], False, literals)
            out += _pieces(text[start:end], True, literals)
            pos = end
        out += _pieces(text[pos:], False, literals)
        return merge_segments(out)

    def _escape(self, messages: list[dict], tools: list[dict] | None):
        """Replace special-token strings inside data by placeholders (kept as plain text)."""
        if self._special_re is None:
            return list(messages), tools, []
        blob = json.dumps([list(messages), tools], ensure_ascii=False)
        if not self._special_re.search(blob):
            return list(messages), tools, []
        if PLACEHOLDER_OPEN in blob or PLACEHOLDER_CLOSE in blob:
            raise TemplateError("the row holds special-token text and the private-use characters "
                                "U+E000/U+E001 the encoder needs to keep it plain text")
        literals: list[str] = []
        index: dict[str, int] = {}

        def sub(match: re.Match) -> str:
            lit = match.group(0)
            if lit not in index:
                index[lit] = len(literals)
                literals.append(lit)
            return f"{PLACEHOLDER_OPEN}{index[lit]}{PLACEHOLDER_CLOSE}"

        def walk(x: Any) -> Any:
            if isinstance(x, str):
                return self._special_re.sub(sub, x)
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, dict):
                return {k: walk(v) for k, v in x.items()}
            return x

        return walk(list(messages)), walk(tools), literals

    def _check_escape(self, messages: list[dict], segs: list[Segment]) -> None:
        """With placeholders the template must render the same bytes as without them."""
        real = self.render(messages, tools_of(messages))
        bos = len(self.bos) if self.bos and real.startswith(self.bos) else 0
        if "".join(v for _, v, _ in segs) != real[bos:]:
            raise TemplateError("the chat template treats special-token text inside the data "
                                "differently from other text; remove it from the row")

    def _probe_features(self) -> dict[str, bool]:
        """Which parts of the tool format this template renders (a row using a missing one is
        refused, not silently rendered without it)."""
        user = {"role": "user", "content": "Q"}

        def differs(a: tuple, b: tuple) -> bool:
            try:
                return self.render(*a) != self.render(*b)
            except TemplateError:
                return False

        def call(name: str) -> dict:
            return {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": {"x": 1}}}]}

        def tool(text: str) -> list[dict]:
            return [user, call("probe_tool"), {"role": "tool", "content": text},
                    {"role": "assistant", "content": "A"}]

        def think(text: str) -> list[dict]:
            return [user, {"role": "assistant", "content": "A", "reasoning_content": text}]

        return {"tools": differs(([user], [_PROBE_TOOL]), ([user], None)),
                "tool_calls": differs(([user, call("probe_a")], None), ([user, call("probe_b")], None)),
                "tool_role": differs((tool("R1"), None), (tool("R2"), None)),
                "reasoning_content": differs((think("R1"), None), (think("R2"), None))}

    def _check_features(self, messages: list[dict], tools: list[dict] | None) -> None:
        used = {"tools": bool(tools),
                "tool_calls": any(m.get("tool_calls") for m in messages),
                "tool_role": any(m["role"] == "tool" for m in messages),
                # transformers passes "thinking"/"reasoning" to templates as reasoning_content too
                "reasoning_content": any(m.get(k) for m in messages for k in REASONING_KEYS)}
        missing = [k for k, v in used.items() if v and not self.features[k]]
        if missing:
            raise TemplateError(f"the chat template ({self.source}) does not render "
                                f"{', '.join(missing)}, which this row uses (it would be dropped "
                                f"silently); pass a template that does with --chat_template FILE "
                                f"(or the built-in chatml_tools)")

    def _probe_end_tokens(self) -> list[str]:
        """The special token the template writes after an answer (and after a tool call)."""
        def after_answer(make: Any) -> str | None:
            a, b = self.render(make("Aaa"), None), self.render(make("Bbb"), None)
            suffix = a[len(a) - _common_suffix_len(a, b):]
            found = self._special_re.search(suffix) if self._special_re else None
            return found.group(0) if found else None

        user = {"role": "user", "content": "Q"}
        ends = [after_answer(lambda s: [user, {"role": "assistant", "content": s}])]
        if self.features["tool_calls"]:
            ends.append(after_answer(lambda s: [user, {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"x": s}}}]}]))
        if ends[0] is None:
            hint = (" (--chat_template chatml_tools needs <|im_start|> and <|im_end|> tokens: "
                    "--add_tokens '<|im_start|>' '<|im_end|>')" if "<|im_end|>" in self.template else "")
            raise TemplateError(f"tokenizer {self.tok.name_or_path}: the chat template "
                                f"({self.source}) puts no special token after an assistant answer, "
                                f"so no end-of-turn token can be trained{hint}; choose a built-in "
                                f"--template or another --chat_template")
        return list(dict.fromkeys(e for e in ends if e))

    def describe(self) -> dict:
        return {"name": self.name, "chat_template": self.template, "source": self.source,
                "end_of_turn": self.end_tokens, "features": self.features,
                "format": "tokenizer.apply_chat_template(messages, tools=tools, tokenize=False); "
                          "assistant turns (from the generation prompt's end to the end-of-turn "
                          "token) trained, found by prefix renders; BOS string removed and "
                          "re-added by policy"}


def _common_suffix_len(a: str, b: str) -> int:
    return common_prefix_len(a[::-1], b[::-1])


def _special_strings(tok: Any) -> set[str]:
    """Every token string the tokenizer parses as a *special* token from text."""
    out = {str(t) for t in tok.all_special_tokens}
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    out |= {str(t) for t in decoder.values() if getattr(t, "special", False)}
    return {t for t in out if t}


def _pieces(text: str, trained: bool, literals: list[str]) -> list[Segment]:
    """Markup pieces; placeholders become ("text", literal) segments (encoded as plain text)."""
    if not text:
        return []
    if not literals:
        return [("markup", text, trained)]
    out: list[Segment] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        out.append(("markup", text[pos:m.start()], trained))
        out.append(("text", literals[int(m.group(1))], trained))
        pos = m.end()
    out.append(("markup", text[pos:], trained))
    return out
