"""Prompt templates: a conversation -> a list of segments, each with its own loss flag.

A segment is `(kind, value, trained)`:
  ("text", str, bool)   data text (message content): encoded with add_special_tokens=False; the
                        encoder re-encodes it with special tokens split if it would otherwise produce
                        a control token (BOS/EOS/pad/unk/end-of-turn), so data never injects one.
  ("markup", str, bool) template glue (may contain special-token strings such as <|im_start|>).
  ("ids", list, bool)   literal token ids (EOS, end-of-turn).

Prompt and answer pieces are separate segments and are tokenized separately, so no BPE merge
crosses the prompt/answer boundary. BOS is *not* a template matter: the encoder prepends it once per
document iff the tokenizer's convention adds one (see tokenizer_policy.py).

>>> render(NoneTemplate(eos_id=2), [{"role": "user", "content": "Hi"},
...                                  {"role": "assistant", "content": "Yo"}])
[('text', 'Hi', False), ('text', 'Yo', True), ('ids', [2], True)]
"""

from __future__ import annotations

from typing import Any

Segment = tuple  # (kind, value, trained)
Message = dict   # {"role": "system"|"user"|"assistant", "content": str}

TEMPLATE_NAMES = ("none", "chat", "alpaca", "chatml", "llama2")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


class TemplateError(ValueError):
    """A template cannot be used with this tokenizer, or cannot render this conversation."""


def render(template: Any, messages: list[Message]) -> list[Segment]:
    """Render `messages` with `template` and merge neighbouring segments of the same kind/loss."""
    return merge_segments(template.segments(messages))


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Join adjacent segments with equal kind and loss flag; drop empty ones.

    >>> merge_segments([("text", "a", False), ("text", "b", False), ("ids", [], True)])
    [('text', 'ab', False)]
    """
    out: list[Segment] = []
    for kind, value, trained in segments:
        if len(value) == 0:
            continue
        if out and out[-1][0] == kind and out[-1][2] == trained:
            out[-1] = (kind, out[-1][1] + value, trained)
        else:
            out.append((kind, value if kind != "ids" else list(value), trained))
    return out


class NoneTemplate:
    """Contents verbatim: prompt = system + user texts, answer = assistant text + EOS."""

    name = "none"

    def __init__(self, *, eos_id: int):
        self.end_ids = [eos_id]

    def segments(self, messages: list[Message]) -> list[Segment]:
        out: list[Segment] = []
        for m in messages:
            trained = m["role"] == "assistant"
            out.append(("text", m["content"], trained))
            if trained:
                out.append(("ids", self.end_ids, True))
        return out

    def describe(self) -> dict:
        return {"name": self.name, "format": "system + user contents verbatim (loss 0), then the "
                "assistant content verbatim + EOS (loss 1); no separators"}


class AlpacaTemplate:
    """Stanford Alpaca prompt; the row's system text replaces the default preamble."""

    name = "alpaca"
    user_fmt = "### Instruction:\n{content}\n\n### Response:\n"

    def __init__(self, *, eos_id: int):
        self.end_ids = [eos_id]

    def segments(self, messages: list[Message]) -> list[Segment]:
        system = ALPACA_SYSTEM
        out: list[Segment] = []
        for m in messages:
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                lead = system + "\n\n" if not out else "\n\n"
                out.append(("text", lead + self.user_fmt.format(content=m["content"]), False))
            else:
                out += [("text", m["content"], True), ("ids", self.end_ids, True)]
        return out

    def describe(self) -> dict:
        return {"name": self.name, "default_system": ALPACA_SYSTEM,
                "format": "{system}\\n\\n" + self.user_fmt.replace("\n", "\\n") +
                "{answer}<EOS>, later turns start with \\n\\n### Instruction:"}


class ChatMLTemplate:
    """<|im_start|>role\\ncontent<|im_end|>\\n; the assistant's <|im_end|> is the trained end."""

    name = "chatml"

    def __init__(self, *, tokenizer: Any):
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
        if missing:
            raise TemplateError(f"--template chatml needs {missing} as single tokens, which this "
                                f"tokenizer lacks; add them with --add_tokens '<|im_start|>' "
                                f"'<|im_end|>' or choose --template alpaca/llama2/none")
        self.start_ids = [vocab["<|im_start|>"]]
        self.end_ids = [vocab["<|im_end|>"]]

    def segments(self, messages: list[Message]) -> list[Segment]:
        out: list[Segment] = []
        for m in messages:
            trained = m["role"] == "assistant"
            out += [("ids", self.start_ids, False), ("text", m["role"] + "\n", False),
                    ("text", m["content"], trained), ("ids", self.end_ids, trained),
                    ("text", "\n", False)]
        return out[:-1]  # nothing after the last end-of-turn token

    def describe(self) -> dict:
        return {"name": self.name, "format": "<|im_start|>{role}\\n{content}<|im_end|>\\n per "
                "message; generation prompt <|im_start|>assistant\\n", "end_of_turn": "<|im_end|>"}


class Llama2Template:
    """Meta's Llama-2 chat format: [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>.

    Unlike Meta's reference code, BOS is not repeated before each turn: one BOS per document.
    """

    name = "llama2"

    def __init__(self, *, eos_id: int):
        self.end_ids = [eos_id]

    def segments(self, messages: list[Message]) -> list[Segment]:
        system, out = None, []
        for m in messages:
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                body = m["content"].strip()
                if system is not None:
                    body, system = f"<<SYS>>\n{system}\n<</SYS>>\n\n{body}", None
                out.append(("text", f"[INST] {body} [/INST]", False))
            else:
                out += [("text", f" {m['content'].strip()} ", True), ("ids", self.end_ids, True)]
        return out

    def describe(self) -> dict:
        return {"name": self.name, "format": "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} "
                "[/INST] + ' {answer} ' + EOS per turn; one BOS per document (not per turn)"}


class ChatTemplate:
    """The tokenizer's own `chat_template`; assistant contents are located in the rendered text.

    Everything between answers is prompt (loss 0); each assistant content plus the special token
    that the template puts right after it (e.g. <|im_end|>) is trained, and so is any text the
    template puts between the generation prompt and the content (Qwen3: the last turn's
    "\n</think>\n\n" after the generation prompt "<|im_start|>assistant\n<think>\n"). A BOS string rendered by
    the template is removed (the encoder adds BOS by policy). Text after the last answer's
    end-of-turn token is not stored.
    """

    name = "chat"

    def __init__(self, *, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"--template chat: tokenizer {tokenizer.name_or_path} has no "
                                f"chat_template; choose --template alpaca/chatml/llama2/none")
        self.tok = tokenizer
        self.specials = sorted({str(t) for t in tokenizer.all_special_tokens}
                               | set(tokenizer.get_added_vocab()), key=len, reverse=True)
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        text = self._render_text(probe)
        end = self._end_token(text, text.rfind("A") + 1)
        if end is None:
            raise TemplateError(f"tokenizer {tokenizer.name_or_path}: its chat_template puts no "
                                f"special token after an assistant answer, so no end-of-turn token "
                                f"can be trained; choose a built-in --template")
        self.end_token = end
        self.end_ids = [tokenizer.convert_tokens_to_ids(end)]

    def _render_text(self, messages: list[Message], *, generation_prompt: bool = False) -> str:
        text = self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)
        bos = self.tok.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text

    def _end_token(self, text: str, pos: int) -> str | None:
        """The special token starting at `pos`, after optional spaces/newlines."""
        rest = text[pos:].lstrip(" \n")
        return next((s for s in self.specials if rest.startswith(s)), None)

    def segments(self, messages: list[Message]) -> list[Segment]:
        text = self._render_text(messages)
        out: list[Segment] = []
        cursor = scan = 0   # cursor: end of what is emitted; scan: end of the last located message
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                found, p = _locate(text, m["content"], scan)
                scan = p + len(found) if p >= 0 else scan
                continue
            gen_end, plain_end = self._history_ends(messages[:k], text)
            content, pos = _locate(text, m["content"], max(scan, cursor, gen_end or plain_end or 0))
            if pos < 0:
                raise TemplateError(f"message {k}: the chat_template rewrote the assistant content "
                                    f"beyond recognition; cannot mark its tokens for loss")
            after = pos + len(content)
            gap = len(text[after:]) - len(text[after:].lstrip(" \n"))
            if not text.startswith(self.end_token, after + gap):
                raise TemplateError(f"message {k}: no {self.end_token} after the assistant answer")
            start = gen_end if gen_end is not None and cursor <= gen_end <= pos else pos
            out += [("markup", text[cursor:start], False), ("markup", text[start:pos], True),
                    ("text", content + text[after:after + gap], True), ("ids", self.end_ids, True)]
            cursor = scan = after + gap + len(self.end_token)
        return out

    def _history_ends(self, history: list[Message], text: str) -> tuple[int | None, int | None]:
        """Lengths of the history rendered with / without the generation prompt, where the full
        text continues them (else None). The trained part of a turn starts right after the
        generation prompt when the text continues it, so whatever the model must produce after
        that prompt (e.g. Qwen3's "\n</think>\n\n") is trained; otherwise at the content."""
        gen = self._render_text(history, generation_prompt=True)
        plain = self._render_text(history)
        return (len(gen) if text.startswith(gen) else None,
                len(plain) if text.startswith(plain) else None)

    def describe(self) -> dict:
        return {"name": self.name, "chat_template": self.tok.chat_template,
                "end_of_turn": self.end_token,
                "format": "tokenizer.apply_chat_template(messages, tokenize=False); BOS string "
                          "removed and re-added by policy; text after the last end-of-turn "
                          "token dropped"}


def _locate(text: str, content: str, start: int) -> tuple[str, int]:
    """Find `content` (or its stripped form, as templates often strip) in `text` from `start`."""
    for candidate in (content, content.strip(), content.lstrip("\n")):
        pos = text.find(candidate, start) if candidate else -1
        if pos >= 0:
            return candidate, pos
    return content, -1


def make_template(name: str, *, tokenizer: Any, eos_id: int | None) -> Any:
    """Build a template by `--template` name, checking it fits the tokenizer."""
    if name not in TEMPLATE_NAMES:
        raise TemplateError(f"--template {name}: choose one of {', '.join(TEMPLATE_NAMES)}")
    if name == "chat":
        return ChatTemplate(tokenizer=tokenizer)
    if name == "chatml":
        return ChatMLTemplate(tokenizer=tokenizer)
    if eos_id is None:
        raise TemplateError(f"--template {name} ends answers with EOS, but tokenizer "
                            f"{tokenizer.name_or_path} has no eos_token")
    cls = {"none": NoneTemplate, "alpaca": AlpacaTemplate, "llama2": Llama2Template}[name]
    return cls(eos_id=eos_id)
