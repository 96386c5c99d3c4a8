"""Helpers for the encoder tests (a uniquely named module, so it never clashes with another
directory's conftest): paths, ../shared tokenizers loaded once, token-layout assertions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
TOKENIZERS = SHARED / "tokenizers"
DATA = SHARED / "data"
PLUGINS = REPO / "encoder" / "user_data_loader"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_CACHE: dict[str, object] = {}


def shared_tokenizer_path(name: str) -> str:
    path = TOKENIZERS / name
    if not path.is_dir():
        pytest.skip(f"{path} absent (../shared holds the real tokenizers; not in a fresh clone)")
    return str(path)


def shared_data(name: str) -> str:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} absent (../shared holds the real data; not in a fresh clone)")
    return str(path)


def real_tokenizer(name: str):
    """../shared/tokenizers/NAME through transformers (the independent oracle the tests decode
    with; the encoder under test may load it with the light loader), once per session."""
    path = shared_tokenizer_path(name)
    if name not in _CACHE:
        from encoder.tokenizer_policy import load_encoding_tokenizer
        _CACHE[name] = load_encoding_tokenizer(path, backend="transformers")
    return _CACHE[name]


def loss_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def check_layout(tok, encoded, answers: list[str], *, end_id: int, expect_bos: bool,
                 end_is_eos_only: bool = True) -> None:
    """BOS once iff expected; every answer is a loss span ending with `end_id`; nothing else trained."""
    ids, mask = encoded.ids, encoded.mask
    assert encoded.status == "ok"
    bos = tok.bos_token_id
    if expect_bos:
        assert ids[0] == bos and int((ids == bos).sum()) == 1, ids[:5]
    else:
        assert bos is None or ids[0] != bos
    spans = loss_spans(mask)
    assert len(spans) == len(answers), (spans, answers)
    for (s, e), answer in zip(spans, answers):
        assert ids[e - 1] == end_id                      # end-of-turn token is trained
        assert end_id not in ids[s:e - 1].tolist()       # no EOS leaked inside the answer
        decoded = tok.decode(ids[s:e - 1]).strip()
        # a chat template may train text between its generation prompt and the content
        assert decoded == answer.strip() or (not end_is_eos_only and decoded.endswith(answer))
    last = spans[-1][1]
    assert ids[last - 1] == end_id
    # a chat template's own text after the last end-of-turn (Qwen: "\n") is kept, untrained, so
    # the sample equals apply_chat_template byte for byte; other templates end with the end token
    assert last == len(ids) if end_is_eos_only else tok.decode(ids[last:]).strip() == ""
    if end_is_eos_only:
        assert int((ids == end_id).sum()) == len(answers)
    pad = tok.pad_token_id
    if pad is not None and pad not in (bos, end_id):
        assert pad not in ids.tolist()
    if bos is not None:
        assert not mask[ids == bos].any() or bos == end_id
