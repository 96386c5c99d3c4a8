"""Issue 7 item 4: bad plugins. A wrong row k stops the run with an error naming the plugin file
and row k (exit 2, no manifest, no shard files), or with --skip_invalid is skipped and counted
exactly (stdout summary and stats.json). A plugin that cannot be used at all gives a one-line error.

Already covered in tests/encoder/test_cli.py (not repeated here): a dict without "a"
(test_bad_row_names_plugin_and_row), a plugin raising at row 1 / a missing plugin file / a file
without data_loader (test_plugin_exception_and_missing_plugin). Added here: None / int rows, empty
strings, lone surrogates, several bad rows with exact skip counts, a raise that --skip_invalid
cannot skip, one-line errors for unusable plugin files, and a 10 MB row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOOD = {"qa": {"q": "What is the capital of France?", "a": "Paris is the capital of France."},
        "pretrain": "The quick brown fox jumps over the lazy dog.",
        "chat": {"messages": [{"role": "user", "content": "Write to Alice."},
                              {"role": "assistant", "content": "Dear Alice, the report."}]}}
NUM_ROWS = 6
BAD_ROW = 3

# (case id, encode_type, python expression of the bad row, expected problem text)
BAD_ROWS = [
    ("qa_none", "qa", "None", "qa rows must be dicts, got NoneType"),
    ("qa_int", "qa", "7", "qa rows must be dicts, got int"),
    ("pretrain_none", "pretrain", "None", "pretrain rows must be str, got NoneType"),
    ("pretrain_int", "pretrain", "7", "pretrain rows must be str, got int"),
    ("pretrain_empty", "pretrain", "''", "empty text"),
    ("qa_empty_answer", "qa", "{'q': 'x', 'a': '   '}", "'a' is empty"),
    ("qa_answer_none", "qa", "{'q': 'x', 'a': None}", "'a' must be str, got NoneType"),
    ("chat_empty_messages", "chat", "{'messages': []}", "'messages' must be a non-empty list"),
    ("chat_empty_answer", "chat",
     "{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': ''}]}",
     "assistant message 1 is empty"),
    ("pretrain_surrogate", "pretrain", "'text \\ud800 more'", "lone surrogate '\\ud800'"),
    ("qa_surrogate", "qa", "{'q': 'x \\udfff', 'a': 'y'}", "'q' holds a lone surrogate"),
    ("chat_surrogate", "chat",
     "{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'a\\ud800'}]}",
     "message 1 holds a lone surrogate"),
]


def write_rows_plugin(path: Path, encode_type: str, bad: dict[int, str], n: int = NUM_ROWS) -> str:
    """A plugin yielding n good rows, except row i = eval(bad[i])."""
    path.write_text(
        f"GOOD = {GOOD[encode_type]!r}\nBAD = {{{', '.join(f'{k}: {v}' for k, v in bad.items())}}}\n"
        f"\ndef data_loader():\n    for i in range({n}):\n"
        f"        yield BAD[i] if i in BAD else GOOD\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def encode(hermetic_tokenizer_dir, tmp_path, capsys):
    """encode(plugin, encode_type, *flags) -> (exit code, stdout, stderr, dataset dir), in-process."""
    from encoder.main import main

    def run(plugin: str, encode_type: str, *flags: str):
        out = tmp_path / "out"
        if encode_type == "chat":  # the hermetic tokenizer has no chat_template
            flags = ("--template", "alpaca", *flags)
        code = main(["--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path", plugin,
                     "--encode_type", encode_type, "--max_length", "256", "--output_path",
                     str(out), "--corpus_name", "c", *flags])
        cap = capsys.readouterr()
        return code, cap.out, cap.err, out / "c"
    return run


def assert_nothing_complete(d: Path) -> None:
    names = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    assert not [n for n in names if n.startswith("manifest") or ".bin" in n or ".idx" in n
                or n == "stats.json"], names


@pytest.mark.parametrize("case,encode_type,bad,problem", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_named_or_skipped_exactly(case, encode_type, bad, problem, encode, tmp_path):
    plugin = write_rows_plugin(tmp_path / f"{case}.py", encode_type, {BAD_ROW: bad})
    code, _, err, d = encode(plugin, encode_type)
    assert code == 2
    [line] = err.strip().splitlines()[-1:]
    assert f"{plugin}: row {BAD_ROW}: " in line and problem in line, err
    assert "Traceback" not in err
    assert_nothing_complete(d)

    code, out, err, d = encode(plugin, encode_type, "--skip_invalid", "--overwrite")
    assert code == 0, err
    assert "skipped invalid 1" in out and f"row {BAD_ROW}: " in out
    stats = json.loads((d / "stats.json").read_text())
    assert stats["rows"] == NUM_ROWS and stats["skipped_invalid"] == 1
    assert stats["skip_reasons"][0].startswith(f"row {BAD_ROW}: ") and problem in \
        stats["skip_reasons"][0]
    from shardfmt import open_dataset
    ds = open_dataset(str(d))
    assert ds.manifests[0]["metadata"]["stats"]["skipped_invalid"] == 1
    if encode_type != "pretrain":  # one sample per good row
        assert len(ds) == NUM_ROWS - 1


def test_many_bad_rows_exact_skip_count(encode, tmp_path):
    bad = {1: "None", 4: "7", 5: "{'q': 'x'}", 8: "{'q': 'x', 'a': ''}", 9: "{'q': '\\ud800', 'a': 'y'}"}
    plugin = write_rows_plugin(tmp_path / "many.py", "qa", bad, n=12)
    code, _, err, _ = encode(plugin, "qa")
    assert code == 2 and f"{plugin}: row 1: qa rows must be dicts, got NoneType" in err
    code, out, err, d = encode(plugin, "qa", "--skip_invalid", "--overwrite")
    assert code == 0, err
    stats = json.loads((d / "stats.json").read_text())
    assert stats["skipped_invalid"] == 5 and stats["samples"] == 7 and "skipped invalid 5" in out
    assert [r.split(":")[0] for r in stats["skip_reasons"]] == [f"row {k}" for k in sorted(bad)]


def test_raise_at_row_k_is_not_skippable(encode, tmp_path):
    plugin = tmp_path / "raises.py"
    plugin.write_text("def data_loader():\n    for i in range(9):\n        if i == 5:\n"
                      "            raise OSError('disk went away')\n"
                      "        yield {'q': 'x', 'a': 'y'}\n")
    for flags in ((), ("--skip_invalid",)):
        code, _, err, d = encode(str(plugin), "qa", *flags)
        assert code == 2 and "Traceback" not in err
        assert f"{plugin}: row 5: the plugin raised OSError: disk went away" in err
        assert_nothing_complete(d)


@pytest.mark.parametrize("code_text,problem", [
    (None, "no such file"),
    ("x = 1\n", "defines no data_loader() function"),
    ("data_loader = 3\n", "defines no data_loader() function"),
    ("def data_loader(:\n", "importing the plugin failed: SyntaxError"),
    ("import no_such_module_xyz\n", "importing the plugin failed: ModuleNotFoundError"),
    ("def data_loader(path):\n    yield path\n", "data_loader() failed"),
], ids=["missing", "no_function", "not_callable", "syntax_error", "import_error", "needs_args"])
def test_unusable_plugin_one_line_error(code_text, problem, encode, tmp_path):
    plugin = tmp_path / "plugin.py"
    if code_text is not None:
        plugin.write_text(code_text)
    code, out, err, d = encode(str(plugin), "qa")
    assert code == 2 and "Traceback" not in err
    [line] = [l for l in err.splitlines() if "error" in l]   # (a "setup ..." progress line may precede)
    assert line == err.strip().splitlines()[-1]
    assert line.startswith("llm-encode: error: ") and str(plugin) in line and problem in line, err
    assert_nothing_complete(d)


@pytest.mark.slow  # ~15-30 s: the tokenizer itself needs that long for 2.5 M tokens
def test_ten_megabyte_row_is_dropped_and_counted(encode, tmp_path):
    """A 10 MB question (2.5 M tokens) among normal rows: not a crash or hang; with the default
    --truncation drop it is dropped and counted exactly, the other rows are kept."""
    plugin = write_rows_plugin(tmp_path / "big.py", "qa", {BAD_ROW: "{'q': 'fox ' * 2_500_000, 'a': 'y'}"})
    code, out, err, d = encode(plugin, "qa")
    assert code == 0, err
    stats = json.loads((d / "stats.json").read_text())
    assert stats["dropped"] == 1 and stats["samples"] == NUM_ROWS - 1 and stats["skipped_invalid"] == 0
    assert "dropped 1" in out
