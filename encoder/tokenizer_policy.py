"""Load the tokenizer, add tokens, and ask it (never assume) how it marks documents.

The special-token policy of a dataset is decided here once and recorded in the manifest:
BOS once at the start of each document iff `tokenizer("a")` adds one; EOS (or the template's
end-of-turn token) appended by the encoder itself; text pieces always encoded with
`add_special_tokens=False`; pad never stored.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from encoder.backends import TOKENIZER_BACKENDS
from encoder.errors import InputNotFoundError, UsageError
from encoder.json_tokenizer import JsonTokenizer, light_load_problem
from shardfmt import dtype_max_id, smallest_dtype_for

SAVE_DTYPES = ("auto", "uint16", "int16", "int32")


@dataclass(frozen=True)
class TokenPolicy:
    """What the tokenizer does by itself, measured on the string "a".

    >>> TokenPolicy(bos_id=1, eos_id=2, adds_bos=True, adds_eos=False).doc_prefix()
    [1]
    """

    bos_id: int | None
    eos_id: int | None
    adds_bos: bool
    adds_eos: bool

    def doc_prefix(self) -> list[int]:
        """Ids that open every document: `[bos_id]` iff the tokenizer's convention adds one."""
        return [self.bos_id] if self.adds_bos and self.bos_id is not None else []

    def as_dict(self) -> dict:
        return asdict(self)


def load_encoding_tokenizer(path: str, *, add_tokens: list[str] | None = None,
                            backend: str = "auto", chat_template: bool = False) -> Any:
    """The tokenizer at `path`, then `add_tokens` added as special tokens.

    backend "auto"/"gigatoken"/"tokenizers": a `JsonTokenizer` (tokenizers library only, ~1 s)
    where it is known to equal transformers' tokenizer (`light_load_problem` is None), else
    `AutoTokenizer.from_pretrained(path, local_files_only=True)` (~8 s: imports torch).
    "transformers": always the latter. (Which engine then encodes: encoder/backends.py.)
    The process environment is left alone (no HF_HUB_OFFLINE): `path` is a local directory.
    `chat_template`: the caller renders the tokenizer's jinja chat template (transformers only).
    Tokens the tokenizer already knows as single tokens are not added twice; the existing
    additional special tokens are kept (the original tool replaced them).
    """
    if backend not in TOKENIZER_BACKENDS:
        raise UsageError(f"--tokenizer_backend {backend}: choose one of "
                         f"{', '.join(TOKENIZER_BACKENDS)}")
    if not os.path.isdir(path):
        raise InputNotFoundError(f"--tokenizer_path {path}: no such directory (expected a "
                                 f"Hugging Face tokenizer dir with tokenizer.json / "
                                 f"tokenizer_config.json)")
    if backend != "transformers" and _light_load_problem(path, chat_template=chat_template,
                                                         add_tokens=add_tokens) is None:
        try:
            return JsonTokenizer(path)
        except ValueError:
            pass  # e.g. a special token missing from tokenizer.json: let transformers decide
    from transformers import AutoTokenizer  # heavy import (torch), kept local

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:   # a directory that holds no (readable) tokenizer
        raise UsageError(f"--tokenizer_path {path}: transformers cannot load a tokenizer from it "
                         f"({type(e).__name__}: {e}); give a Hugging Face tokenizer directory "
                         f"(tokenizer.json / tokenizer_config.json)") from e
    new = [t for t in add_tokens or [] if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, **_keep_existing_kw(tok))
    return tok


def _light_load_problem(path: str, *, chat_template: bool,
                        add_tokens: list[str] | None) -> str | None:
    """`light_load_problem`, with a config file that is not JSON reported as bad input."""
    try:
        return light_load_problem(path, needs_chat_template=chat_template, add_tokens=add_tokens)
    except ValueError as e:   # json.JSONDecodeError: tokenizer_config.json / tokenizer.json
        raise UsageError(f"--tokenizer_path {path}: a config file is not valid JSON ({e}); give "
                         f"a Hugging Face tokenizer directory") from e


def _keep_existing_kw(tok: Any) -> dict:
    """The keyword that keeps existing additional special tokens (transformers 5 vs 4 spelling)."""
    import inspect
    params = inspect.signature(tok.add_special_tokens).parameters
    for name in ("replace_extra_special_tokens", "replace_additional_special_tokens"):
        if name in params:
            return {name: False}
    return {}


def measure_policy(tok: Any) -> TokenPolicy:
    """Encode "a" with and without special tokens and see what the tokenizer adds.

    >>> measure_policy(llama2_tok)   # doctest: +SKIP
    TokenPolicy(bos_id=1, eos_id=2, adds_bos=True, adds_eos=False)
    """
    with_sp = list(tok("a", add_special_tokens=True)["input_ids"])
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    adds_bos = bos is not None and len(with_sp) > len(plain) and with_sp[0] == bos
    adds_eos = eos is not None and len(with_sp) > len(plain) and with_sp[-1] == eos \
        and with_sp[-len(plain) - 1:-1] == plain
    return TokenPolicy(bos_id=bos, eos_id=eos, adds_bos=adds_bos, adds_eos=adds_eos)


def choose_dtype(requested: str, *, vocab_size: int, num_added: int = 0) -> str:
    """Resolve `--save_dtype` against `len(tokenizer)` (added tokens included), before tokenizing.

    >>> choose_dtype("auto", vocab_size=50257)
    'uint16'
    >>> choose_dtype("int16", vocab_size=151669)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    encoder.errors.UsageError: --save_dtype int16 holds ids up to 32767, but the tokenizer has ...
    """
    if requested not in SAVE_DTYPES:
        raise UsageError(f"--save_dtype {requested}: choose one of {', '.join(SAVE_DTYPES)}")
    fits = smallest_dtype_for(vocab_size)
    if requested == "auto":
        return fits
    if vocab_size - 1 > dtype_max_id(requested):
        added = f" (incl. {num_added} added)" if num_added else ""
        raise UsageError(f"--save_dtype {requested} holds ids up to {dtype_max_id(requested)}, but "
                         f"the tokenizer has {vocab_size} tokens{added} (max id {vocab_size - 1}); "
                         f"use --save_dtype {fits} (or auto)")
    return requested
