"""Helpers for the fault-injection tests: run the encoder / trainer as child processes that can be
killed at a known point, given a small RLIMIT_FSIZE, or denied write access."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "trainer") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "trainer"))  # trainer_testlib (reused, not modified)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def limit_file_size(nbytes: int):
    """preexec_fn: RLIMIT_FSIZE = nbytes, and SIGXFSZ ignored so write() fails with EFBIG."""
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return pre


def drop_dac_override() -> None:
    """preexec_fn: the tests run as root; drop the capabilities that ignore file permissions
    (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER) from the bounding set, so the exec'd child obeys
    a read-only (0o555) directory like an ordinary user would."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def encoder_cmd(*flags: str) -> list[str]:
    return [sys.executable, str(REPO / "encoder" / "main.py"), *flags]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Wait until `path` exists; fail (with the child's stderr) if the child exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"child exited {proc.returncode} before {path.name} appeared:\n"
                                 f"{err[-3000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.01)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it was started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
