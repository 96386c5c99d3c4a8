"""No code execution from data: nothing on a load path unpickles.

Two checks: a source scan (no pickle loads, `torch.load` only with `weights_only=True`, `np.load`
only with `allow_pickle=False`), and a payload test: a pickle that would create a marker file when
unpickled is planted under every file name a dataset directory can hold, then the dataset is
opened, read, inspected and verified. The marker must never appear.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardfmt import ShardWriter, open_dataset
from shardfmt.verify import verify_dataset

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shardfmt", "encoder", "trainer", "bench", "run_scripts")


def _sources():
    for pkg in PACKAGES:
        yield from sorted((REPO / pkg).rglob("*.py"))


def _calls(text: str, name: str):
    """Every `name(` call in `text` with its argument text (balanced parentheses)."""
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[m.end():i - 1]


def test_source_has_no_unsafe_load():
    problems = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        for banned in ("pickle.load", "pickle.loads", "cPickle", "dill.load", "joblib.load",
                       "marshal.load", "shelve.open"):
            if banned in text:
                problems.append(f"{rel}: uses {banned}")
        for args in _calls(text, "torch.load"):
            if "weights_only=True" not in args:
                problems.append(f"{rel}: torch.load({args.strip()[:60]}) without weights_only=True")
        for args in _calls(text, "np.load"):
            if "allow_pickle=False" not in args:
                problems.append(f"{rel}: np.load({args.strip()[:60]}) without allow_pickle=False")
    assert not problems, "\n".join(problems)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["c_00000.bin", "c_00000.idx", "manifest.json",
                                    "stats.json", "tokenizer/tokenizer.json", "extra.pkl"])
def test_planted_pickle_is_never_unpickled(tmp_path, victim):
    with ShardWriter(tmp_path, "c", dtype="uint16", encode_type="qa", max_length=16,
                     tokenizer_info={"len": 100}) as w:
        w.add_sample([([1, 2, 3], [0, 1, 1])])
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    target = tmp_path / "c" / victim
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload)
    try:
        ds = open_dataset(tmp_path / "c")
        for i in range(len(ds)):
            ds[i]
        verify_dataset(ds)
    except (ValueError, FileNotFoundError, OSError):
        pass  # refusing the damaged dataset is fine; running the payload is not
    # the two CLI commands read the directory independently: run them side by side
    clis = [subprocess.Popen([sys.executable, "-m", "shardfmt", "inspect", str(tmp_path / "c"),
                              "--show", "1"], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"}),
            subprocess.Popen([sys.executable, "-m", "shardfmt", "verify", str(tmp_path / "c")],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for cli in clis:
        cli.wait()
    assert not marker.exists(), f"unpickled a payload planted as {victim}"
