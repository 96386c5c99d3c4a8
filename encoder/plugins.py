"""Data-loader plugins: load a `.py` file by path, iterate its rows, check every row.

A plugin is any Python file defining a generator function `data_loader(**kwargs)`. It yields
  pretrain: str
  qa:       {"q": str, "a": str, "system": str (optional)}
  chat:     {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
            or, with tools (encoder/conversation.py): {"messages": [... "tool" messages, assistant
            "tool_calls", "reasoning_content" ...], "tools": [JSON schema, ...]}

>>> plugin = load_plugin("encoder/user_data_loader/alpaca.py")     # doctest: +SKIP
>>> rows = iter_rows(plugin, encode_type="qa", kwargs={})           # doctest: +SKIP
>>> next(rows)                                                      # doctest: +SKIP
(0, {'messages': [{'role': 'user', 'content': '...'}, {'role': 'assistant', 'content': '...'}]})
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from encoder.errors import PluginError, UsageError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Plugin:
    path: str
    fn: Callable[..., Any]

    def accepts(self, name: str) -> bool:
        """True if `data_loader` takes keyword `name` (explicitly; **kwargs does not count)."""
        return name in inspect.signature(self.fn).parameters


def load_plugin(path: str) -> Plugin:
    """Import `path` as a module (importlib) and return its `data_loader` function."""
    p = Path(path)
    if not p.is_file():
        raise PluginError(f"--data_loader_path {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"encoder_plugin_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user file: report any import-time failure in one line
        raise PluginError(f"{path}: importing the plugin failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, "data_loader", None)
    if not callable(fn):
        raise PluginError(f"{path}: defines no data_loader() function; a plugin must define a "
                          f"generator `def data_loader(**kwargs): yield ...`")
    return Plugin(path=str(path), fn=fn)


def parse_kv_args(items: list[str] | None) -> dict[str, str]:
    """`["path=a.json", "n=3"]` -> `{"path": "a.json", "n": "3"}` (values stay strings).

    >>> parse_kv_args(["path=x=y.json"])
    {'path': 'x=y.json'}
    """
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--data_loader_args {item!r}: expected key=value")
        out[key] = value
    return out


def raw_rows(plugin: Plugin, kwargs: dict) -> Iterator[tuple[int, Any]]:
    """`(row_index, row)` from the plugin; a plugin exception becomes a PluginError naming the row.

    A generator that raised cannot be resumed, so this stops the run even with --skip_invalid.
    """
    try:
        gen = iter(plugin.fn(**kwargs))   # a plain list/iterable works too
    except TypeError as e:
        raise PluginError(f"{plugin.path}: data_loader({', '.join(kwargs)}) failed: {e}; check "
                          f"--data_loader_args against the plugin's parameters") from e
    except Exception as e:   # a plain function (not a generator) that raised before any row
        raise PluginError(f"{plugin.path}: data_loader() raised {type(e).__name__}: {e}") from e
    index = 0
    while True:
        try:
            row = next(gen)
        except StopIteration:
            return
        except Exception as e:
            raise PluginError(f"{plugin.path}: row {index}: the plugin raised "
                              f"{type(e).__name__}: {e} (a generator cannot continue after an "
                              f"exception, so --skip_invalid cannot skip this)") from e
        yield index, row
        index += 1


def count_rows(plugin: Plugin, kwargs: dict) -> int:
    """Number of rows the plugin yields (one extra pass; used to cut contiguous --part slices)."""
    return sum(1 for _ in raw_rows(plugin, kwargs))


def part_bounds(part: int, num_parts: int, total: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of part `part` of `num_parts` over `total` rows.

    >>> [part_bounds(i, 3, 10) for i in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """
    return part * total // num_parts, (part + 1) * total // num_parts


def part_kwargs(plugin: Plugin, part: tuple[int, int]) -> dict[str, int] | None:
    """The keywords that tell a part-aware plugin its part: `part_index`/`num_parts` (or the older
    `part`/`num_parts`); None if `data_loader` takes neither pair."""
    if not plugin.accepts("num_parts"):
        return None
    for name in ("part_index", "part"):
        if plugin.accepts(name):
            return {name: part[0], "num_parts": part[1]}
    return None


def iter_part(plugin: Plugin, kwargs: dict, *, part: tuple[int, int] | None) -> Iterator[tuple[int, Any]]:
    """Rows of this part. Plugins taking `part_index`/`num_parts` are told and yield only their
    part (encoder/input_files.py has the helpers); otherwise the encoder counts the rows and keeps
    the contiguous slice `part_bounds`."""
    if part is None:
        yield from raw_rows(plugin, kwargs)
        return
    told = part_kwargs(plugin, part)
    if told is not None:
        yield from raw_rows(plugin, {**kwargs, **told})
        return
    i, n = part
    start, stop = part_bounds(i, n, count_rows(plugin, kwargs))
    yield from itertools.islice(raw_rows(plugin, kwargs), start, stop)


def check_row(row: Any, *, encode_type: str) -> Any:
    """Validate one row and normalise it: pretrain -> str, qa/chat -> list of messages.

    Raises ValueError with the problem (the caller adds plugin file and row index).

    >>> check_row({"q": "2+2?", "a": "4"}, encode_type="qa")
    [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    """
    if encode_type == "pretrain":
        if not isinstance(row, str):
            raise ValueError(f"pretrain rows must be str, got {type(row).__name__}")
        if not row:
            raise ValueError("empty text")
        return _utf8_text(row, "text")
    if encode_type == "preference":  # encoder/preference.py: both sides checked as chat rows
        from encoder.preference import check_preference_row
        return check_preference_row(row, chat_messages=_chat_messages)
    if encode_type == "kto":  # unpaired feedback (encoder/preference.py): checked as a chat row
        from encoder.preference import check_unpaired_row
        return check_unpaired_row(row, chat_messages=_chat_messages)
    if not isinstance(row, dict):
        raise ValueError(f"{encode_type} rows must be dicts, got {type(row).__name__}")
    return _qa_messages(row) if encode_type == "qa" else _chat_messages(row)


def _text_field(row: dict, key: str, *, required: bool = True, nonempty: bool = False) -> str | None:
    if key not in row:
        if required:
            raise ValueError(f"key {key!r} is missing (got keys {sorted(row)})")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be str, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise ValueError(f"{key!r} is empty")
    return _utf8_text(value, repr(key))


def _utf8_text(value: str, what: str) -> str:
    """`value`, if it is encodable as UTF-8 (tokenizers need that). A lone surrogate such as
    '\\ud800' (e.g. from json.loads of a broken escape) would otherwise fail deep inside the
    tokenizer, for a whole batch, without naming the row."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} holds a lone surrogate {value[e.start]!r} at character "
                             f"{e.start}: not valid Unicode text (cannot be encoded as "
                             f"UTF-8)") from None
    return value


def _qa_messages(row: dict) -> list[dict]:
    q = _text_field(row, "q")
    a = _text_field(row, "a", nonempty=True)
    system = _text_field(row, "system", required=False)
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _chat_messages(row: dict) -> list[dict]:
    from encoder.conversation import check_conversation, is_tool_row
    if is_tool_row(row):
        return check_conversation(row)
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("key 'messages' must be a non-empty list of {'role', 'content'} dicts"
                         + ("" if "messages" in row else f" (got keys {sorted(row)})"))
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {k} must be {{'role': one of {ROLES}, 'content': str}}, "
                             f"got {m!r:.80}")
        out.append({"role": m["role"], "content": _utf8_text(m["content"], f"message {k}")})
    _check_turn_order(out)
    return out


def _check_turn_order(msgs: list[dict]) -> None:
    """Optional system first, then user/assistant alternating, ending with a non-empty answer."""
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for k, m in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {k + len(msgs) - len(body)} has role {m['role']!r}, "
                             f"expected {want!r} (optional system first, then user/assistant "
                             f"alternating)")
    if not body or body[-1]["role"] != "assistant":
        raise ValueError("conversation does not end with an assistant turn (nothing to train on)")
    for k, m in enumerate(body):
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"assistant message {k + len(msgs) - len(body)} is empty")
