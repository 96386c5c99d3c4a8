"""Start several commands at once and wait for all (tests/ is on sys.path through its conftest).

Most of a test's subprocess is interpreter start-up and imports on one core: two such commands
side by side on the 2 cores cost about the time of one."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def run_side_by_side(commands: list[list[str]], *, cwd: Path, env: dict,
                     timeout: float) -> list[subprocess.CompletedProcess]:
    """Start every command at once, wait for all; a CompletedProcess each, in order (not
    checked). Output goes to temporary files (pipes would fill and block). A command still
    running after `timeout` s, or when waiting fails, is killed."""
    started = []
    try:
        for cmd in commands:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            started.append((subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                             text=True), out, err))
        results = []
        for proc, out, err in started:
            proc.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(),
                                                       err.read()))
    finally:
        for proc, out, err in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
    return results
