"""Every encoder and shardfmt command follows one exit-code convention (README "Exit codes"):
0 ok, 1 the run failed, 2 bad input or usage (a bad flag, a missing or unreadable path), with a
one-line message naming the flag or file. Only the packages' own errors (encoder.errors,
shardfmt.errors) are caught, so an internal bug keeps its traceback.

All calls are in-process `main(argv)` (argparse's own usage errors raise SystemExit(2)); one
subprocess checks that `python -m shardfmt` hands main()'s code to the shell.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QA_ROWS = [{"q": f"What is {i} plus {i}?", "a": f"It is {2 * i}."} for i in range(8)]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    """A tiny byte-level BPE tokenizer (trained in-process, ~0.2 s), saved as a HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["q"] + " " + r["a"] for r in QA_ROWS] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plugin") / "rows.py"
    path.write_text("import json\n\ndef data_loader(part_index=None, num_parts=None):\n"
                    f"    rows = json.loads({json.dumps(json.dumps(QA_ROWS))})\n"
                    "    i, n = (0, 1) if part_index is None else (int(part_index), int(num_parts))\n"
                    "    yield from rows[i::n]\n")
    return str(path)


def call(main, argv: list, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `main(argv)`; argparse's SystemExit counts as its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> bool:
    """A user error is one short message, not a traceback."""
    return "Traceback" not in err and len(err.strip().splitlines()) <= 3


# -- encoder/main.py (llm-encode) -----------------------------------------------------------------
def encode_flags(tok_dir: str, plugin: str, out: Path) -> list:
    return ["--tokenizer_path", tok_dir, "--data_loader_path", plugin, "--encode_type", "qa",
            "--max_length", "64", "--output_path", out, "--corpus_name", "c"]


def test_encoder_main(tok_dir, plugin, tmp_path, capsys, monkeypatch):
    from encoder.main import main
    flags = encode_flags(tok_dir, plugin, tmp_path / "out")
    assert call(main, [*flags, "--no_such_flag"], capsys)[0] == 2
    code, err = call(main, [*flags, "--tokenizer_path", tmp_path / "nope"], capsys)
    assert code == 2 and f"--tokenizer_path {tmp_path / 'nope'}" in err and one_line(err), err
    code, err = call(main, [*flags, "--data_loader_path", tmp_path / "nope.py"], capsys)
    assert code == 2 and f"{tmp_path / 'nope.py'}: no such file" in err and one_line(err), err
    code, err = call(main, [*flags, "--max_length", "0"], capsys)
    assert code == 2 and "--max_length 0" in err and one_line(err), err
    assert call(main, flags, capsys)[0] == 0
    code, err = call(main, flags, capsys)                 # the dataset exists: bad usage
    assert code == 2 and "--overwrite" in err and one_line(err), err

    # a run that fails while writing (disk full) -> 1, naming the path; no manifest written
    import errno

    from shardfmt import ShardWriter

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "c"))
    monkeypatch.setattr(ShardWriter, "add_sample", disk_full)
    code, err = call(main, encode_flags(tok_dir, plugin, tmp_path / "full"), capsys)
    assert code == 1 and "ENOSPC" in err and str(tmp_path / "full") in err and one_line(err), err
    assert not (tmp_path / "full" / "c" / "manifest.json").exists()


def test_encoder_main_internal_bug_keeps_its_traceback(tok_dir, plugin, tmp_path, monkeypatch):
    """A plain KeyError from inside the encoder (not from the user's plugin) is a bug: main()
    does not turn it into a one-line error with an exit code; it propagates (traceback)."""
    import encoder.main

    def broken(*args, **kwargs):
        raise KeyError("internal")
    monkeypatch.setattr(encoder.main, "summary_lines", broken)
    with pytest.raises(KeyError, match="internal"):
        encoder.main.main([str(a) for a in encode_flags(tok_dir, plugin, tmp_path / "out")])


def test_encoder_plugin_errors_are_user_errors(tok_dir, tmp_path, capsys):
    """The same KeyError raised by the user's plugin is bad input: 2, naming the file and row."""
    from encoder.main import main
    bad = tmp_path / "bad.py"
    bad.write_text("def data_loader():\n    yield {'q': 'a', 'a': 'b'}\n    raise KeyError('x')\n")
    code, err = call(main, encode_flags(tok_dir, str(bad), tmp_path / "out"), capsys)
    assert code == 2 and f"{bad}: row 1: the plugin raised KeyError" in err and one_line(err)


# -- encoder/tokenizer.py -------------------------------------------------------------------------
def test_encoder_tokenizer_tool(tok_dir, plugin, tmp_path, capsys, monkeypatch):
    import encoder.tokenizer
    from encoder.tokenizer import main
    assert call(main, ["train", "--no_such_flag"], capsys)[0] == 2
    code, err = call(main, ["extend", "--base", tmp_path / "nope", "--pieces", tmp_path / "p.txt",
                            "--output", tmp_path / "o"], capsys)
    assert code == 2 and f"--pieces {tmp_path / 'p.txt'}: no such file" in err and one_line(err)
    pieces = tmp_path / "p.txt"
    pieces.write_text("zyxwvut\nquokka\n")
    code, err = call(main, ["extend", "--base", tmp_path / "nope", "--pieces", pieces,
                            "--output", tmp_path / "o"], capsys)
    assert code == 2 and f"--base {tmp_path / 'nope'}" in err and one_line(err), err
    extend = ["extend", "--base", tok_dir, "--pieces", pieces]
    assert call(main, [*extend, "--output", tmp_path / "ok"], capsys)[0] == 0
    code, err = call(main, [*extend, "--output", tmp_path / "ok"], capsys)   # not empty
    assert code == 2 and "exists and is not empty" in err and one_line(err), err
    # the run's own check fails (base ids moved) -> 1, nothing written
    monkeypatch.setattr(encoder.tokenizer, "verify_base_ids", lambda base, new: (10, [("a", 1, 2)]))
    code, err = call(main, [*extend, "--output", tmp_path / "moved"], capsys)
    assert code == 1 and "base tokens changed id" in err and not (tmp_path / "moved").exists()


# -- encoder/distributed.py -----------------------------------------------------------------------
def test_encoder_distributed(tok_dir, plugin, tmp_path, capsys):
    from encoder.distributed import main
    flags = ["--engine", "local", "--num_parts", "2", *encode_flags(tok_dir, plugin, tmp_path / "d")]
    assert call(main, [*flags, "--no_such_flag"], capsys)[0] == 2
    code, err = call(main, [*flags, "--data_loader_path", tmp_path / "nope.py"], capsys)
    assert code == 2 and f"{tmp_path / 'nope.py'}: no such file" in err and one_line(err), err
    code, err = call(main, [*flags, "--merge_only"], capsys)   # no part encoded: the run fails
    assert code == 1 and "2 of 2 parts are not complete" in err, err
    assert call(main, flags, capsys)[0] == 0


# -- python -m shardfmt ---------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> Path:
    from shardfmt import ShardWriter
    with ShardWriter(tmp_path / "data", "c", dtype="uint16", encode_type="qa", max_length=64,
                     tokens_per_file=1 << 20, tokenizer_info={"vocab_hash": "t"}) as w:
        for k in range(4):
            w.add_sample([([1, 2 + k, 3], [0, 1, 1])])
    return tmp_path / "data" / "c"


def test_shardfmt_every_subcommand(dataset, tmp_path, capsys):
    from shardfmt.__main__ import main
    missing = tmp_path / "nope"
    commands = {   # subcommand -> (argv on success, argv naming a missing dataset)
        "inspect": ([dataset], [missing]),
        "verify": ([dataset], [missing]),
        "export-megatron": ([dataset, tmp_path / "m" / "doc"], [missing, tmp_path / "m2" / "doc"]),
        "merge": ([dataset, tmp_path / "merged"], [missing, tmp_path / "merged2"]),
    }
    for name, (good, bad) in commands.items():
        assert call(main, [name, *good, "--no_such_flag"], capsys)[0] == 2, name
        code, err = call(main, [name, *bad], capsys)
        assert code == 2 and f"{missing}: no such dataset" in err and one_line(err), (name, err)
        code, err = call(main, [name, *good], capsys)
        assert code == 0, (name, err)
    assert call(main, ["merge", dataset], capsys)[0] == 2           # no output directory
    code, err = call(main, ["export-megatron", dataset, tmp_path / "m" / "doc"], capsys)
    assert code == 2 and "--overwrite" in err and one_line(err), err    # exists: bad usage
    code, err = call(main, ["export-megatron", dataset, tmp_path / "x", "--dtype", "float9"], capsys)
    assert code == 2 and "--dtype float9" in err and one_line(err), err
    code, err = call(main, ["merge", dataset, tmp_path / "merged"], capsys)
    assert code == 2 and "--overwrite" in err and one_line(err), err


def test_shardfmt_verify_corrupt_data_is_a_failed_run(dataset, capsys):
    from shardfmt.__main__ import main
    bin_path = next(dataset.glob("*.bin"))
    raw = bytearray(bin_path.read_bytes())
    raw[0] ^= 0xFF
    bin_path.write_bytes(bytes(raw))
    code, _ = call(main, ["verify", dataset], capsys)
    assert code == 1     # the data does not match its checksums
    assert call(main, ["inspect", dataset], capsys)[0] == 0   # inspect reads no tokens


def test_shardfmt_internal_bug_keeps_its_traceback(dataset, monkeypatch):
    import shardfmt.__main__ as cli

    def broken(ds):
        raise KeyError("internal")
    monkeypatch.setattr(cli, "dataset_summary", broken)
    with pytest.raises(KeyError, match="internal"):
        cli.main(["inspect", str(dataset)])


def test_shardfmt_exit_code_reaches_the_shell(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shardfmt", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "no such dataset" in out.stderr and one_line(out.stderr)


def test_encoder_bad_inputs_found_late_are_still_user_errors(tok_dir, plugin, tmp_path, capsys):
    """Inputs that used to escape as builtin exceptions are reported as ours: 2, one line."""
    from encoder.main import main
    flags = encode_flags(tok_dir, plugin, tmp_path / "out")
    code, err = call(main, [*flags, "--corpus_name", "a/b"], capsys)
    assert code == 2 and "--corpus_name 'a/b'" in err and one_line(err), err
    broken = tmp_path / "tok"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_text("{not json")
    code, err = call(main, [*flags, "--tokenizer_path", broken], capsys)
    assert code == 2 and f"--tokenizer_path {broken}" in err and one_line(err), err
    eager = tmp_path / "eager.py"   # a plain function that raises before yielding any row
    eager.write_text("def data_loader():\n    return open('/nonexistent/rows.jsonl')\n")
    code, err = call(main, [*flags, "--data_loader_path", eager], capsys)
    assert code == 2 and f"{eager}: data_loader() raised FileNotFoundError" in err, err
