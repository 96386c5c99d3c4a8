"""A Hugging Face tokenizer directory read with the `tokenizers` library alone.

Why: `AutoTokenizer.from_pretrained` imports transformers and, through it, torch: 7-9 s of
start-up on this machine before the first row is encoded, for data that often takes less time
than that to tokenize. `tokenizers.Tokenizer.from_file("tokenizer.json")` loads in 0.3 s (llama2)
to 1.2 s (qwen3). transformers 5 runs that very `tokenizer.json` (its backend pipeline is the
file, JSON-equal, for every tokenizer in ../shared), so the ids are the same; special tokens come
from `tokenizer_config.json`, as transformers reads them.

The light loader is used only where that equivalence is known to hold (`light_load_problem`
says why not otherwise, and the encoder falls back to transformers): no custom code, no chat
template needed, no tokens to add, and none of the config keys that make transformers rebuild
the pipeline (`legacy: true`, `add_prefix_space` on a Metaspace tokenizer, ...).
tests/encoder/test_json_tokenizer.py checks ids, policy, identity and whole datasets against
transformers on every tokenizer in ../shared and on config variants, so a transformers upgrade
that changes the rule fails CI.

>>> tok = JsonTokenizer("../shared/tokenizers/llama2")              # doctest: +SKIP
>>> tok(["Hi"], add_special_tokens=True)["input_ids"], tok.bos_token_id   # doctest: +SKIP
([[1, 6324]], 1)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer_config.json "tokenizer_class" values whose transformers 5 class runs tokenizer.json
# unchanged (checked by the tests above); any other class goes through transformers.
VERIFIED_CLASSES = frozenset({
    "PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizer", "LlamaTokenizerFast",
    "GPT2Tokenizer", "GPT2TokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast"})


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def light_load_problem(path: str, *, needs_chat_template: bool = False,
                       add_tokens: list[str] | None = None) -> str | None:
    """Why `path` must be loaded with transformers, or None when `JsonTokenizer` gives the same
    tokenizer. Cheap: reads the two small JSON files, not tokenizer.json's vocabulary.

    >>> light_load_problem("../shared/tokenizers/qwen3", needs_chat_template=True)  # doctest: +SKIP
    '--template chat renders the jinja chat_template with transformers'
    """
    root = Path(path)
    if needs_chat_template:
        return "--template chat renders the jinja chat_template with transformers"
    if add_tokens:
        return "--add_tokens saves the extended tokenizer with transformers"
    if not (root / "tokenizer.json").is_file():
        return "no tokenizer.json (a slow/sentencepiece-only tokenizer)"
    if not (root / "tokenizer_config.json").is_file():
        return "no tokenizer_config.json (special tokens would be guessed)"
    config = _read_json(root / "tokenizer_config.json")
    if "auto_map" in config:
        return "tokenizer_config.json has auto_map (custom tokenizer code)"
    cls = config.get("tokenizer_class")
    if cls not in VERIFIED_CLASSES:
        return f"tokenizer_class {cls!r} is not one verified to run tokenizer.json unchanged"
    if config.get("legacy") is True:
        return "legacy: true makes transformers rebuild the Llama pre-tokenizer"
    prefix = config.get("add_prefix_space")
    if prefix is not None and _prefix_space_conflict(root, wanted=bool(prefix)):
        return f"add_prefix_space: {str(prefix).lower()} makes transformers rebuild the pipeline"
    if (root / "special_tokens_map.json").is_file():
        extra = _read_json(root / "special_tokens_map.json")
        for key in SPECIAL_KEYS:
            if key in extra and _token_text(extra[key]) != _token_text(config.get(key)):
                return f"special_tokens_map.json and tokenizer_config.json disagree on {key}"
    return None


def _prefix_space_conflict(root: Path, *, wanted: bool) -> bool:
    """Does tokenizer.json's pre-tokenizer disagree with the config's add_prefix_space (then
    transformers rewrites it)? Parses tokenizer.json (gpt2: 1.3 MB, ~20 ms), only when the
    config sets the key."""
    pre = json.dumps(_read_json(root / "tokenizer.json").get("pre_tokenizer")).replace(" ", "")
    prepends = ('"add_prefix_space":true' in pre or '"prepend_scheme":"first"' in pre
                or '"prepend_scheme":"always"' in pre)
    never = '"add_prefix_space":false' in pre or '"prepend_scheme":"never"' in pre
    return (never and wanted) or (prepends and not wanted)


class JsonTokenizer:
    """The subset of a transformers tokenizer that the encoder's non-chat path uses, over a
    `tokenizers.Tokenizer` loaded from `tokenizer.json`. Check `light_load_problem` first."""

    def __init__(self, path: str):
        import tokenizers
        import xxhash

        root = Path(path)
        self.name_or_path = str(path)
        # read once: `tokenizers` parses these bytes, gigatoken parses the same bytes
        # (encoder/backends.py), and their digest keys the calibration cache (verdict_cache.py);
        # xxh3 of qwen3's 18 MB file: ~3 ms
        self.json_bytes = (root / "tokenizer.json").read_bytes()
        self.json_size = len(self.json_bytes)
        self.json_digest = xxhash.xxh3_128(self.json_bytes).hexdigest()
        self.backend_tokenizer = tokenizers.Tokenizer.from_buffer(self.json_bytes)
        config = _read_json(root / "tokenizer_config.json")
        # the transformers 5 class this stands in for, as recorded in manifests (informational)
        cls = config.get("tokenizer_class") or "PreTrainedTokenizerFast"
        self.class_name = "TokenizersBackend" if cls == "PreTrainedTokenizerFast" \
            else cls.removesuffix("Fast")
        self.chat_template = None
        for key in SPECIAL_KEYS:
            text = _token_text(config.get(key))
            if text is not None and self.backend_tokenizer.token_to_id(text) is None:
                raise ValueError(f"{root / 'tokenizer_config.json'}: {key} {text!r} is not in "
                                 f"tokenizer.json's vocabulary")
            setattr(self, key, text)

    # -- ids of the special tokens (None when the tokenizer has none; id 0 is a real id) --------
    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    # -- vocabulary -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend_tokenizer.get_added_tokens_decoder().items()}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    # -- encoding ---------------------------------------------------------------------------------
    def __call__(self, texts: str | list[str], *, add_special_tokens: bool = True,
                 split_special_tokens: bool = False) -> dict[str, Any]:
        """`{"input_ids": ...}` like a transformers tokenizer (a list of lists for a list)."""
        backend = self.backend_tokenizer
        single = isinstance(texts, str)
        backend.encode_special_tokens = split_special_tokens
        try:
            encs = backend.encode_batch_fast([texts] if single else list(texts),
                                             add_special_tokens=add_special_tokens)
        finally:
            backend.encode_special_tokens = False
        ids = [e.ids for e in encs]
        return {"input_ids": ids[0] if single else ids}
