"""A local Ray cluster for tests and benchmarks: a head and a second node on this machine, bound
to 127.0.0.1 only, each with its own temp dir, stopped exactly (never other Ray instances).

    cluster = LocalRayCluster()
    try:
        cluster.start()
        ... python -m encoder.distributed --address cluster.address, env=cluster.env ...
    finally:
        cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every live (non-zombie) process. The
    start time makes a (pid, start) pair unique, so a pid reused later is never mistaken."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                table[int(d.name)] = (int(fields[1]), int(fields[19]))
    return table


def our_processes(roots: list[int], marker: str) -> set[tuple[int, int]]:
    """(pid, start) of every live process below `roots` or whose command line names `marker`
    (our unique Ray temp dir)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {r for r in roots if r in table}, list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    for pid in table:
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.add(pid)
        except OSError:
            continue
    return {(pid, table[pid][1]) for pid in found if pid != os.getpid()}


def still_alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    table = process_table()
    return {(pid, start) for pid, start in procs if table.get(pid, (0, None))[1] == start}


class LocalRayCluster:
    """A Ray head and a second node on this machine, bound to 127.0.0.1 only, each started with
    `ray start --block` (through ray_loopback_node.py, see there why) in its own session with its
    own temp dir, and a private auth token. stop() ends exactly these processes: their process
    trees and groups, then anything still naming our temp dir; never other Ray instances."""

    def __init__(self, cpus_per_node: int = 1):
        import secrets
        self.root = tempfile.mkdtemp(prefix="rayi18-", dir="/tmp")  # short: unix socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.cpus = cpus_per_node
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",   # keep 127.0.0.1 (see the wrapper)
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def _start(self, name: str, *flags: str) -> None:
        log = open(Path(self.root) / f"{name}.log", "w")
        cmd = [sys.executable, str(Path(__file__).with_name("ray_loopback_node.py")), "start",
               "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
               f"--temp-dir={self.root}/{name}", "--disable-usage-stats", *flags]
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, env=self.env))

    def start(self) -> None:
        self._start("head", "--head", f"--port={self.port}", "--include-dashboard=false")
        wait_for(lambda: self._check() and _port_open(self.port), 90, "the Ray head's GCS port")
        self._start("worker", f"--address={self.address}")
        wait_for(lambda: self._check() and self._logged("worker", "will now block forever"), 90,
                 "the second Ray node")

    def _check(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                self.keep_logs = True
                raise RuntimeError(f"ray start exited with {p.returncode}: see {self.root}/*.log")
        return True

    def _logged(self, name: str, text: str) -> bool:
        return text in (Path(self.root) / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        ours = our_processes([p.pid for p in self.procs], self.root)
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)   # ray start --block stops its node
        deadline = time.time() + 3   # a test cluster has nothing to drain
        while still_alive(ours) and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(50):   # what did not stop in 3 s (Ray drains for up to 30 s): SIGKILL
            ours |= our_processes([], self.root)
            left = still_alive(ours)
            if not left:
                break
            for pid, _ in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for p in self.procs:
            p.poll()
        self.stopped = ours
        if not still_alive(ours) and not getattr(self, "keep_logs", False):   # logs go too
            shutil.rmtree(self.root, ignore_errors=True)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for(cond, seconds: float, what: str, every: float = 0.5) -> None:
    deadline = time.time() + seconds
    while not cond():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)
