"""Every run_scripts/*.sh parses, and every --flag it passes to a program exists in that program's
--help (so the scripts cannot drift from the programs)."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "run_scripts").glob("*.sh"))
PROGRAMS = {"encoder/main.py": [sys.executable, "encoder/main.py"],
            "trainer/train.py": [sys.executable, "trainer/train.py"],
            "-m shardfmt": [sys.executable, "-m", "shardfmt"],
            "-m encoder.distributed": [sys.executable, "-m", "encoder.distributed"]}


@lru_cache(maxsize=None)
def help_text(program: str, sub: str = "") -> str:
    cmd = PROGRAMS[program] + ([sub] if sub else []) + ["--help"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout


def invocations(script: Path):
    """(program, subcommand, flags) of each program call, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    for line in text.splitlines():
        line = line.split(" #")[0]
        for program in PROGRAMS:
            if program in line:
                rest = line.split(program, 1)[1]
                sub = rest.split()[0] if program == "-m shardfmt" and rest.split() else ""
                yield program, sub, set(re.findall(r"(?<![\w-])(--[a-z_][a-z0-9_-]*)", rest))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_flags_exist(script):
    for program, sub, flags in invocations(script):
        text = help_text(program, sub)
        missing = sorted(f for f in flags if f not in text)
        assert not missing, f"{script.name}: {program} {sub} has no {missing} in its --help"


def test_scripts_call_the_programs():
    calls = {p: list(invocations(p)) for p in SCRIPTS}
    assert any(prog == "encoder/main.py" for c in calls.values() for prog, _, _ in c)
    assert sum(prog == "trainer/train.py" for c in calls.values() for prog, _, _ in c) >= 2
