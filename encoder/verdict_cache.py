"""What a run learns about a tokenizer.json once, kept across runs: gigatoken's calibration verdict
on the built-in hard strings, and the manifest's vocab_hash.

Why: both cost start-up time on every run and only change when the tokenizer or a library
changes. For qwen3 (151k vocabulary) the vocab hash is ~0.2 s of GIL time (a 151k-entry dict +
xxh3) and the built-in calibration strings are encoded by both engines on every run.

What is cached, and what is still done on every run:
  * cached: "gigatoken's ids equal the reference's on CALIBRATION_TEXTS" (only a pass is stored;
    a mismatch is never cached, so a failing tokenizer is re-checked and refused every run) and
    the vocab hash.
  * every run: the user's first batch is encoded by both engines and compared, and the sampled
    cross-check runs while encoding (encoder/backends.py, document_encoder.py).

Safety:
  * keyed by everything the verdict depends on: the xxh3-128 digest and size of the exact
    tokenizer.json bytes both libraries parsed, the `tokenizers` and gigatoken versions, a digest
    of the calibration set, the reference engine and this file's schema. The entry stores its full
    key and is ignored unless that key equals the expected one, so a different tokenizer, library
    version or calibration set never reuses it, whatever the file is named.
  * only for tokenizers loaded from tokenizer.json alone (`JsonTokenizer`): a transformers tokenizer
    may differ from its file (added tokens, rebuilt pipelines), so it is always calibrated in full.
  * JSON only (no pickle); written atomically (shardfmt's write_text_atomic: a temporary file of
    a unique name in the same directory, fsynced, then os.replace), so a reader sees the old entry
    or the new one, never half of one, even with several encoders writing at once. Unreadable,
    corrupt or foreign entries count as missing; a cache that cannot be written is skipped.

Location: $LLM_ENCODE_CACHE, else $XDG_CACHE_HOME/llm-encode, else ~/.cache/llm-encode;
LLM_ENCODE_CACHE=off turns it off (every run calibrates in full).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from shardfmt.writer import write_text_atomic

CACHE_ENV = "LLM_ENCODE_CACHE"
SCHEMA = 1
_OFF = ("", "0", "off", "none", "false", "no")


def default_cache_dir() -> Path | None:
    """The cache directory from the environment (read, never set), or None when turned off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-encode"


def text_digest(texts: tuple[str, ...] | list[str]) -> str:
    """xxh3-128 of a list of strings (length-prefixed, so ["ab"] and ["a", "b"] differ)."""
    import xxhash

    h = xxhash.xxh3_128()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def library_version(name: str) -> str:
    """The installed version of `name` (gigatoken has no __version__): from the one
    `name-VERSION.dist-info` directory beside the package (~1 ms), else importlib.metadata
    (~30-60 ms with its import, on the start-up path)."""
    import importlib

    module = importlib.import_module(name)
    found = getattr(module, "__version__", None)
    if isinstance(found, str) and found:
        return found
    site = Path(module.__file__).resolve().parent.parent
    infos = list(site.glob(f"{name}-*.dist-info"))
    if len(infos) == 1:
        return infos[0].name[len(name) + 1:-len(".dist-info")]
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class VerdictCache:
    """One cache entry: `<directory>/verdicts/<digest of key>.json` holding `{"key": key, ...}`.

    >>> cache = VerdictCache(Path("/tmp/c"), {"tokenizer_json": "ab12...", "gigatoken": "0.10.0"})  # doctest: +SKIP
    >>> cache.calibration_pass() is None     # nothing stored yet              # doctest: +SKIP
    True
    """

    def __init__(self, directory: Path, key: dict[str, Any]):
        import xxhash

        self.key = {"schema": SCHEMA, **key}
        name = xxhash.xxh3_128(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.path = Path(directory) / "verdicts" / f"{name}.json"
        self._entry: dict | None = None

    @classmethod
    def for_tokenizer(cls, tok: Any, *, calibration: tuple[str, ...] | list[str],
                      directory: Path | None | str = "default") -> "VerdictCache | None":
        """The entry for `tok`, or None when caching does not apply: the cache is off, or `tok`
        was not loaded from tokenizer.json alone (no `json_digest`: a transformers tokenizer)."""
        digest = getattr(tok, "json_digest", None)
        if digest is None:
            return None
        where = default_cache_dir() if directory == "default" else directory
        if where is None:
            return None
        import tokenizers
        return cls(Path(where), {
            "tokenizer_json": digest, "tokenizer_json_bytes": int(tok.json_size),
            "tokenizers": tokenizers.__version__, "gigatoken": library_version("gigatoken"),
            "calibration": text_digest(calibration), "calibration_strings": len(calibration),
            "reference": "tokenizers"})

    # -- reading ----------------------------------------------------------------------------------
    def entry(self) -> dict:
        """The stored entry if it exists, parses and carries exactly our key; else {}."""
        if self._entry is None:
            self._entry = {}
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):   # missing, unreadable, not JSON: recompute
                return self._entry
            if isinstance(data, dict) and data.get("key") == self.key:
                self._entry = data
        return self._entry

    def calibration_pass(self) -> dict | None:
        """The stored pass on the calibration set ({"strings": n, "checked_utc": ...}) or None."""
        verdict = self.entry().get("calibration")
        if isinstance(verdict, dict) and verdict.get("verdict") == "equal":
            return verdict
        return None

    def vocab_hash(self) -> str | None:
        value = self.entry().get("vocab_hash")
        return value if isinstance(value, str) and value else None

    # -- writing ----------------------------------------------------------------------------------
    def record_calibration_pass(self, *, strings: int) -> bool:
        """Store "gigatoken equals the reference on the calibration set". Only passes are stored."""
        return self._update({"calibration": {
            "verdict": "equal", "strings": strings,
            "checked_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})

    def record_vocab_hash(self, value: str) -> bool:
        return self._update({"vocab_hash": value})

    def _update(self, fields: dict) -> bool:
        """Merge `fields` into the entry and write it atomically. False (and nothing changed on
        disk) when the directory cannot be written: the cache is an optimisation only."""
        self._entry = None   # re-read: another process may have stored the other field meanwhile
        entry = {**self.entry(), **fields, "key": self.key}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # shardfmt's one durable writer: a unique temp per process, removed on failure
            write_text_atomic(self.path, json.dumps(entry, indent=1, sort_keys=True))
        except OSError:
            return False
        self._entry = entry
        return True


def cached_tokenizer_identity(tok: Any) -> dict:
    """shardfmt's `tokenizer_identity(tok)` with the vocab hash taken from (and stored in) the
    cache when `tok` was loaded from tokenizer.json alone; equal to the uncached one."""
    from shardfmt import tokenizer_identity

    from encoder.backends import CALIBRATION_TEXTS
    cache = VerdictCache.for_tokenizer(tok, calibration=CALIBRATION_TEXTS)
    known = cache.vocab_hash() if cache is not None else None
    info = tokenizer_identity(tok, known_vocab_hash=known)
    if cache is not None and known is None:
        cache.record_vocab_hash(info["vocab_hash"])
    return info
