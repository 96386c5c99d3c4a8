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

from encoder.errors import TemplateError

Segment = tuple  # (kind, value, trained)
Message = dict   # {"role": "system"|"user"|"assistant", "content": str}

TEMPLATE_NAMES = ("none", "chat", "alpaca", "chatml", "llama2")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


def render(template: Any, messages: list[Message]) -> list[Segment]:
    """Render `messages` with `template` and merge neighbouring segments of the same kind/loss."""
    if not getattr(template, "supports_tools", False):
        from encoder.conversation import uses_tool_format
        if uses_tool_format(messages):
            raise TemplateError(f"this row has tools / tool calls / tool messages / reasoning, "
                                f"which --template {template.name} cannot render; use --template "
                                f"chat (the tokenizer's chat template, or --chat_template FILE, or "
                                f"--chat_template chatml_tools)")
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


def make_template(name: str, *, tokenizer: Any, eos_id: int | None,
                  chat_template: str | None = None, chat_template_source: str | None = None) -> Any:
    """Build a template by `--template` name, checking it fits the tokenizer. `chat_template`
    (jinja text, from --chat_template) replaces the tokenizer's own for --template chat."""
    if name not in TEMPLATE_NAMES:
        raise TemplateError(f"--template {name}: choose one of {', '.join(TEMPLATE_NAMES)}")
    if chat_template is not None and name != "chat":
        raise TemplateError(f"--chat_template is used by --template chat only (got --template {name})")
    if name == "chat":
        from encoder.chat_render import ChatTemplate   # jinja rendering + prefix-diff spans
        return ChatTemplate(tokenizer=tokenizer, chat_template=chat_template,
                            source=chat_template_source)
    if name == "chatml":
        return ChatMLTemplate(tokenizer=tokenizer)
    if eos_id is None:
        raise TemplateError(f"--template {name} ends answers with EOS, but tokenizer "
                            f"{tokenizer.name_or_path} has no eos_token")
    cls = {"none": NoneTemplate, "alpaca": AlpacaTemplate, "llama2": Llama2Template}[name]
    return cls(eos_id=eos_id)
