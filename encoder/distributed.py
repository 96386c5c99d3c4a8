"""`python -m encoder.distributed`: encode a corpus as N parts on a Ray cluster (or one part per
Slurm array task), retry failed parts, skip complete parts on a relaunch, then merge.

    python -m encoder.distributed --engine ray --num_parts 64 [--address auto] [--cpus_per_part 2]
        [--max_retries 3]  <the encoder's flags: --tokenizer_path ... --output_path out --corpus_name c4>

Each part is `encoder --part I/N` run inside a Ray task, writing its own dataset; that dataset's
manifest.json (written last by the shard writer) is the part's completion marker. The parts
joined in order equal a single-process run (same samples in the same order unpacked, the same
samples packed per part); `shardfmt.merge` then writes OUTPUT/CORPUS/manifest.json pointing
into the parts, so no token is copied.

Layout (JOB = hash of the encoder flags, the plugin file and N: a relaunch with other settings
never mixes parts):
    OUTPUT/CORPUS.parts/JOB/job.json                   what is being encoded
    OUTPUT/CORPUS.parts/JOB/part-00003-of-00064/CORPUS/  part 3; its manifest.json means done
    OUTPUT/CORPUS.parts/JOB/part-00003-of-00064/encode.log  that part's encoder output
    OUTPUT/CORPUS.parts/JOB/.attempt-00003-<id>/       an attempt in progress (or killed); an
                                                        attempt renames itself to part-... when done
    OUTPUT/CORPUS/manifest.json                        the merged dataset, written last

Paths (plugin, tokenizer, data, output) must mean the same file on every node: a shared
filesystem mounted at the same place, or s3:// / gs:// URLs for the data. Tasks run in the
driver's working directory when it exists on the node.
Exit codes: 0 done, 1 some part failed after its retries (re-run the same command: complete parts
are skipped) or failed its sampled cross-check (never retried: the ids would differ again; the
message names the row and both id lists), 2 bad flags or bad data (a part reported a user error).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from encoder.cli import build_parser as build_encoder_parser
from encoder.cli import check_args
from encoder.errors import (CrossCheckError, EncoderError, EncoderInputError, EncoderRunError,
                            InputNotFoundError, OutputExistsError, UsageError, exit_code)
from shardfmt.errors import ConfigFileError, ShardfmtError
from shardfmt.errors import exit_code as shardfmt_exit_code
from shardfmt.run_config import config_argv
from shardfmt.spec import MANIFEST_NAME

PROGRESS_SECONDS = 5.0     # driver prints a progress line at most this often
REPORT_SECONDS = 1.0       # a task reports its token count to the driver at most this often
# Encoder flags that do not change the bytes written (a relaunch may change them freely).
VOLATILE_FLAGS = ("output_path", "corpus_name", "overwrite", "num_workers", "plot", "part",
                  "analyze")
ENGINES = ("ray", "local")
# Set per part by encode_part (flag -> takes a value); removed from the flags the parts get.
PER_PART_FLAGS = {"--output_path": True, "--corpus_name": True, "--overwrite": False}

EPILOG = """\
examples:
  # this machine's cores, 8 parts, a local Ray instance started and stopped for the run
  python -m encoder.distributed --engine ray --num_parts 8 --tokenizer_path ../shared/tokenizers/gpt2 \\
      --data_loader_path encoder/user_data_loader/text.py --data_loader_args path=c4.jsonl \\
      --encode_type pretrain --max_length 2048 --output_path out --corpus_name c4
  # a running cluster (ray start --head on one node, ray start --address HEAD:6379 on the others)
  python -m encoder.distributed --engine ray --address auto --num_parts 512 --cpus_per_part 2 ...
  # Slurm array task I (run_scripts/encode_slurm.sh), then the merge job
  python -m encoder.distributed --engine local --num_parts 64 --only_parts $SLURM_ARRAY_TASK_ID ...
  python -m encoder.distributed --engine local --num_parts 64 --merge_only ...

every other flag is the encoder's (required: --output_path, --corpus_name; not allowed: --part,
--analyze). --overwrite replaces an existing merged OUTPUT/CORPUS (and, once the new one is
written, deletes parts of earlier encodings under OUTPUT/CORPUS.parts/).

the encoder's flags:
"""


@dataclass(frozen=True)
class Layout:
    """Where the parts of one job and the merged dataset live."""
    output_path: Path
    corpus_name: str
    num_parts: int
    job_id: str

    @property
    def parts_root(self) -> Path:
        return self.output_path / f"{self.corpus_name}.parts"

    @property
    def job_dir(self) -> Path:
        return self.parts_root / self.job_id

    @property
    def merged(self) -> Path:
        return self.output_path / self.corpus_name

    def part_dir(self, index: int) -> Path:
        return self.job_dir / f"part-{index:05d}-of-{self.num_parts:05d}"

    def part_dataset(self, index: int) -> Path:
        return self.part_dir(index) / self.corpus_name

    def is_complete(self, index: int) -> bool:
        return (self.part_dataset(index) / MANIFEST_NAME).is_file()

    def to_dict(self) -> dict:
        return {"output_path": str(self.output_path), "corpus_name": self.corpus_name,
                "num_parts": self.num_parts, "job_id": self.job_id}


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m encoder.distributed", allow_abbrev=False,
        description="Encode N parts of a corpus in parallel (Ray tasks or Slurm array tasks), "
        "retrying failed parts and skipping complete ones, then merge them into "
        "OUTPUT_PATH/CORPUS_NAME.",
        epilog=EPILOG + build_encoder_parser().format_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--engine", choices=ENGINES, default="ray", help="ray (default): the parts run as Ray "
      "tasks; local: in this process, one after the other (Slurm array tasks, tests).")
    a("--address", default=None, help="Ray cluster to join (e.g. auto, HOST:6379, "
      "ray://HOST:10001); default: start a local Ray instance on this machine's cores.")
    a("--num_parts", type=int, required=True, help="N: the corpus is encoded as parts 0..N-1 "
      "(more parts than CPUs balances the load and makes a retry cheaper).")
    a("--cpus_per_part", type=float, default=1.0, help="CPUs Ray reserves per part (default 1; "
      "pair with the encoder's --num_workers to tokenize with several processes per part).")
    a("--max_retries", type=int, default=3, help="times Ray re-runs a part whose worker died or "
      "that raised an unexpected error (default 3); bad data or flags and a failed cross-check "
      "are not retried.")
    a("--ship_code", action="store_true", help="send this checkout's encoder/ and shardfmt/ to "
      "the Ray workers (runtime_env py_modules) instead of using the version installed on each "
      "node; costs a few seconds per node on first use.")
    a("--only_parts", default=None, metavar="I[,J...]", help="encode only these parts and do not "
      "merge (one Slurm array task per part).")
    a("--merge_only", action="store_true", help="encode nothing: merge if every part is complete, "
      "else list the missing ones and exit 1.")
    return p


def parse_command(argv: Sequence[str]) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """(our flags, the encoder's parsed flags, the encoder's argv) or UsageError."""
    ours, rest = build_parser().parse_known_args(list(argv))
    problems = []
    if ours.num_parts < 1:
        problems.append(f"--num_parts {ours.num_parts}: must be >= 1")
    if ours.cpus_per_part <= 0:
        problems.append(f"--cpus_per_part {ours.cpus_per_part}: must be > 0")
    if ours.max_retries < 0:
        problems.append(f"--max_retries {ours.max_retries}: must be >= 0")
    if (ours.address or ours.ship_code) and ours.engine != "ray":
        problems.append("--address and --ship_code need --engine ray")
    if ours.only_parts is not None and ours.merge_only:
        problems.append("--only_parts and --merge_only exclude each other")
    enc_parser = build_encoder_parser()
    try:   # --config RUN.yaml (the encoder's flags, as encoder/main.py reads it): the command
        # line wins; the parts get the resolved flags, so they never read the file themselves
        rest, _ = config_argv(enc_parser, rest)
    except ConfigFileError as e:
        raise UsageError(f"{e} (--config holds the encoder's flags; give encoder.distributed's "
                         f"own flags, such as --num_parts, on the command line)") from e
    enc = enc_parser.parse_args(rest)   # exits 2 with the encoder's usage on bad flags
    for flag in ("part", "analyze"):
        if getattr(enc, flag, None):
            problems.append(f"--{flag} is set by encoder.distributed itself; remove it "
                            f"(--analyze: run python encoder/main.py --analyze instead)")
    if not enc.output_path or not enc.corpus_name:
        problems.append("--output_path and --corpus_name are required")
    if ours.only_parts is not None:
        ours.only_parts = parse_only_parts(ours.only_parts, ours.num_parts, problems)
    if problems:
        raise UsageError("; ".join(problems))
    check_args(enc)   # the encoder's own cross-flag checks (UsageError naming the flag)
    if not Path(enc.data_loader_path).is_file():
        raise InputNotFoundError(f"--data_loader_path {enc.data_loader_path}: no such file")
    return ours, enc, without_flags(rest, PER_PART_FLAGS)


def without_flags(argv: Sequence[str], flags: dict[str, bool]) -> list[str]:
    """`argv` minus `flags` (name -> takes a value), in both `--f v` and `--f=v` forms."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in item
            continue
        out.append(item)
    return out


def parse_only_parts(text: str, num_parts: int, problems: list[str]) -> list[int]:
    try:
        parts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        problems.append(f"--only_parts {text!r}: expected part numbers like 3 or 0,5,7")
        return []
    bad = [i for i in parts if not 0 <= i < num_parts]
    if bad or not parts:
        problems.append(f"--only_parts {text!r}: parts must be in 0..{num_parts - 1}")
    return parts


def job_identity(enc: argparse.Namespace, num_parts: int) -> dict:
    """Everything that decides the bytes of the parts: the encoder flags (not output place, worker
    count, --plot), the plugin file's sha256 and N. Equal identity = parts can be reused."""
    flags = {k: v for k, v in sorted(vars(enc).items()) if k not in VOLATILE_FLAGS}
    plugin = Path(enc.data_loader_path).read_bytes()
    return {"num_parts": num_parts, "encoder_flags": flags,
            "plugin_sha256": hashlib.sha256(plugin).hexdigest()}


def make_layout(enc: argparse.Namespace, identity: dict) -> Layout:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return Layout(output_path=Path(enc.output_path).resolve(), corpus_name=enc.corpus_name,
                  num_parts=identity["num_parts"], job_id=f"job-{digest[:12]}")


def prepare_job(layout: Layout, identity: dict) -> None:
    """Create JOB/ with job.json (kept as is on a relaunch: the id already says it matches)."""
    layout.job_dir.mkdir(parents=True, exist_ok=True)
    job_file = layout.job_dir / "job.json"
    if not job_file.exists():
        from shardfmt.writer import write_json_atomic
        write_json_atomic(job_file, identity)


def merged_is_ours(layout: Layout) -> bool:
    """Is OUTPUT/CORPUS a merged dataset of this very job (so a relaunch may rewrite it)?"""
    manifest = layout.merged / MANIFEST_NAME
    if not manifest.is_file():
        return False
    sources = json.loads(manifest.read_text()).get("metadata", {}).get("merged_from", [])
    want = [str(layout.part_dataset(i)) for i in range(layout.num_parts)]
    return sources == want


def check_output_free(layout: Layout, *, overwrite: bool) -> None:
    """Refuse up front (before any encoding) to replace a dataset without --overwrite."""
    m = layout.merged
    if m.exists() and any(m.iterdir()) and not overwrite and not merged_is_ours(layout):
        state = "a complete" if (m / MANIFEST_NAME).exists() else "an incomplete"
        raise OutputExistsError(f"{m} already holds {state} dataset; pass --overwrite to replace "
                                f"it (once the new one is merged), or choose another "
                                f"--corpus_name / --output_path")


# -- one part -------------------------------------------------------------------------------------
def encode_part(encoder_argv: Sequence[str], layout: Layout, index: int, *,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode part `index` into a fresh attempt directory, then rename it to its final place.

    Returns {"part", "tokens", "samples", "seconds"} ({"skipped": True} if already complete),
    {"part", "error"} for a user error (an EncoderInputError: bad data/flags, retrying would
    fail the same way), or {"part", "failed"} for a sampled cross-check mismatch (the engine's
    ids for a row differ from the reference's: deterministic, so the run fails with the row and
    both id lists instead of being retried). Any other exception propagates (Ray retries the
    task). A killed attempt leaves only its `.attempt-*` directory, which holds no manifest at
    the final place and is never merged.
    """
    from encoder.main import run

    if layout.is_complete(index):
        return {"part": index, "skipped": True}
    started = time.time()
    attempt = layout.job_dir / f".attempt-{index:05d}-{uuid.uuid4().hex[:8]}"
    argv = [*encoder_argv, "--part", f"{index}/{layout.num_parts}", "--output_path",
            str(attempt), "--corpus_name", layout.corpus_name]
    args = build_encoder_parser().parse_args(argv)
    args.overwrite = False
    try:
        check_args(args)   # the flags with this part's --part/--output_path
    except UsageError as e:   # the same on every retry: a user error, not a failed attempt
        return {"part": index, "error": f"{type(e).__name__}: {e}"}
    attempt.mkdir(parents=True)
    try:
        with open(attempt / "encode.log", "w", encoding="utf-8") as log, \
                redirect_stdout(log), redirect_stderr(log):
            print(f"part {index}/{layout.num_parts} on {os.uname().nodename} pid {os.getpid()}: "
                  f"{' '.join(argv)}", file=sys.stderr, flush=True)
            result = run(args, progress=progress)
    except CrossCheckError as e:   # same rows, same ids on every retry: fail the run now
        shutil.rmtree(attempt, ignore_errors=True)
        return {"part": index, "failed": f"{type(e).__name__}: {e}"}
    except EncoderInputError as e:
        shutil.rmtree(attempt, ignore_errors=True)
        if transient(e):
            raise
        return {"part": index, "error": f"{type(e).__name__}: {e}"}
    except BaseException:
        shutil.rmtree(attempt, ignore_errors=True)
        raise
    publish_attempt(attempt, layout, index)
    return {"part": index, "tokens": int(result["tokens"]), "samples": int(result["samples"]),
            "seconds": round(time.time() - started, 3)}


def transient(e: BaseException) -> bool:
    """A plugin that raised because of I/O (a dropped S3 connection, a stale NFS handle) is
    worth retrying; a missing file, bad data or bad flags would fail the same way again."""
    cause = e.__cause__
    return isinstance(cause, OSError) and not isinstance(
        cause, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def publish_attempt(attempt: Path, layout: Layout, index: int) -> None:
    """Rename the finished attempt to part-I-of-N (atomic). If another attempt of the same part
    finished first (a task Ray believed dead that was still running), keep that one: the bytes
    are the same."""
    final = layout.part_dir(index)
    try:
        os.rename(attempt, final)
    except OSError:
        if not layout.is_complete(index):
            raise
        shutil.rmtree(attempt, ignore_errors=True)


# -- engines --------------------------------------------------------------------------------------
class Progress:
    """Parts done, retries and aggregate tokens/s for the driver's progress lines."""

    def __init__(self, layout: Layout, todo: Sequence[int], *, total: int, out: Any = None):
        self.layout, self.todo, self.out = layout, list(todo), out or sys.stderr
        self.total = total   # parts this run is responsible for (all N, or --only_parts)
        self.skipped = total - len(self.todo)
        self.done: dict[int, dict] = {}
        self.failed: dict[int, str] = {}
        self.user_errors: dict[int, str] = {}
        self.deterministic: set[int] = set()   # failed parts a re-run would fail again
        self.started = self.encode_started = time.time()   # the latter: after joining Ray
        self.last_print = 0.0

    def finish(self, result: dict) -> None:
        i = result["part"]
        if "error" in result:
            self.user_errors[i] = result["error"]
        elif "failed" in result:
            self.failed[i] = result["failed"]
            self.deterministic.add(i)
        elif not result.get("skipped"):
            self.done[i] = result

    def line(self, *, live_tokens: int | None = None, retries: int = 0, running: int = 0) -> str:
        tokens = live_tokens if live_tokens is not None else self.tokens_done
        secs = max(time.time() - self.started, 1e-9)
        bits = [f"parts {len(self.done) + self.skipped}/{self.total} done"
                + (f" ({self.skipped} skipped: complete before)" if self.skipped else ""),
                f"{running} to go" if running else "",
                f"{retries} retried" if retries else "",
                f"{len(self.failed) + len(self.user_errors)} failed"
                if self.failed or self.user_errors else "",
                f"{tokens:,} tokens, {tokens / secs:,.0f} tokens/s, {secs:.0f} s"]
        return "[encoder.distributed] " + " | ".join(b for b in bits if b)

    def maybe_print(self, force: bool = False, **kwargs: Any) -> None:
        if force or time.time() - self.last_print >= PROGRESS_SECONDS:
            print(self.line(**kwargs), file=self.out, flush=True)
            self.last_print = time.time()

    @property
    def tokens_done(self) -> int:
        return sum(r["tokens"] for r in self.done.values())


def run_local(encoder_argv: Sequence[str], layout: Layout, todo: Sequence[int],
              progress: Progress) -> None:
    """The parts one after the other in this process (a Slurm array task runs one). Only the
    encoder's own errors are caught (reported per part, the other parts still run): bad flags or
    data -> a user error (exit 2), a run failure or a retryable plugin I/O error -> a failed part
    (exit 1). Anything else is a bug and propagates with its traceback."""
    for i in todo:
        try:
            progress.finish(encode_part(encoder_argv, layout, i))
        except EncoderError as e:
            user_error = isinstance(e, EncoderInputError) and not transient(e)
            (progress.user_errors if user_error else progress.failed)[i] = \
                f"{type(e).__name__}: {e}"
        progress.maybe_print(force=True)


def run_ray(encoder_argv: Sequence[str], layout: Layout, todo: Sequence[int], progress: Progress,
            *, address: str | None, cpus_per_part: float, max_retries: int,
            ship_code: bool = False) -> None:
    """Submit one Ray task per part; collect results as they finish; print progress."""
    import ray

    started = time.time()
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env=code_runtime_env() if ship_code else None)
    print(f"[encoder.distributed] Ray {'joined ' + address if address else 'started locally'} "
          f"in {time.time() - started:.1f} s: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{len(ray.nodes())} node(s); {len(todo)} part(s) to encode", file=progress.out,
          flush=True)
    progress.encode_started = time.time()
    try:
        tracker = ray.remote(num_cpus=0)(TokenTracker).remote()
        task = ray.remote(ray_encode_part)
        refs = {task.options(num_cpus=cpus_per_part, max_retries=max_retries,
                             retry_exceptions=True, name=f"encode_part_{i}").remote(
                    list(encoder_argv), layout.to_dict(), i, os.getcwd(), tracker): i
                for i in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=REPORT_SECONDS)
            for ref in ready:
                i = refs.pop(ref)
                try:
                    progress.finish(ray.get(ref))
                except ray.exceptions.RayError as e:
                    progress.failed[i] = one_line(e)
                    print(f"[encoder.distributed] part {i} failed after {max_retries} "
                          f"retries: {e}", file=progress.out, flush=True)
            try:
                tokens, retries = ray.get(tracker.snapshot.remote(), timeout=30)
            except ray.exceptions.RayError:   # progress is best effort; results come from refs
                tokens, retries = progress.tokens_done, 0
            progress.maybe_print(force=not refs, live_tokens=tokens, retries=retries,
                                 running=len(refs))
    finally:
        ray.shutdown()


def code_runtime_env() -> dict:
    """Ship this checkout's encoder/ and shardfmt/ to the workers (a few hundred KB, cached per
    node), so every node runs the driver's code, not whatever version it has installed."""
    import encoder
    import shardfmt
    return {"py_modules": [os.path.dirname(encoder.__file__), os.path.dirname(shardfmt.__file__)]}


class TokenTracker:
    """A Ray actor: latest token count per part (a retried part restarts from 0) and attempts."""

    def __init__(self) -> None:
        self.tokens: dict[int, tuple[str, int]] = {}
        self.attempts: dict[int, set] = {}

    def update(self, part: int, attempt: str, tokens: int) -> None:
        self.attempts.setdefault(part, set()).add(attempt)
        self.tokens[part] = (attempt, tokens)

    def snapshot(self) -> tuple[int, int]:
        """(tokens encoded so far, number of retries seen)."""
        return (sum(t for _, t in self.tokens.values()),
                sum(len(a) - 1 for a in self.attempts.values()))


def ray_encode_part(encoder_argv: list[str], layout: dict, index: int, cwd: str,
                    tracker: Any) -> dict:
    """The Ray task: run in the driver's directory, report tokens, encode one part."""
    lay = Layout(output_path=Path(layout["output_path"]), corpus_name=layout["corpus_name"],
                 num_parts=layout["num_parts"], job_id=layout["job_id"])
    attempt, last = uuid.uuid4().hex[:8], [0.0]
    tracker.update.remote(index, attempt, 0)

    def report(rows: int, tokens: int) -> None:
        if time.time() - last[0] >= REPORT_SECONDS:
            last[0] = time.time()
            tracker.update.remote(index, attempt, tokens)

    if os.path.isdir(cwd):
        os.chdir(cwd)   # relative paths in the flags mean what they meant on the driver
    result = encode_part(encoder_argv, lay, index, progress=report)
    if "tokens" in result:
        tracker.update.remote(index, attempt, result["tokens"])
    return result


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


# -- merge ----------------------------------------------------------------------------------------
def merge_parts(layout: Layout, *, overwrite: bool) -> Path:
    """OUTPUT/CORPUS/manifest.json over every part, in part order. An existing dataset that is not
    this job's merge is moved aside and deleted only after the new manifest is written."""
    from shardfmt.merge import merge_datasets

    missing = [i for i in range(layout.num_parts) if not layout.is_complete(i)]
    if missing:
        raise EncoderRunError(f"cannot merge: {len(missing)} of {layout.num_parts} parts are not "
                           f"complete ({compact(missing)}); re-run the same command to encode them")
    out = layout.merged
    aside = None
    if out.exists() and any(out.iterdir()) and not merged_is_ours(layout):
        if not overwrite:
            check_output_free(layout, overwrite=False)
        aside = out.parent / f".{out.name}.replaced"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(out, aside)
    merge_datasets([layout.part_dataset(i) for i in range(layout.num_parts)], out, overwrite=True)
    if aside is not None:
        shutil.rmtree(aside)
    if overwrite:   # parts of earlier encodings are no longer referenced by OUTPUT/CORPUS
        for other in layout.parts_root.iterdir():
            if other.name != layout.job_id and (other / "job.json").is_file():
                shutil.rmtree(other)
    for stale in layout.job_dir.glob(".attempt-*"):   # killed attempts (never published)
        shutil.rmtree(stale, ignore_errors=True)
    return out


def compact(indices: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


# -- main -----------------------------------------------------------------------------------------
def run(argv: Sequence[str]) -> int:
    ours, enc, encoder_argv = parse_command(argv)
    identity = job_identity(enc, ours.num_parts)
    layout = make_layout(enc, identity)
    merge = ours.only_parts is None
    check_output_free(layout, overwrite=enc.overwrite)   # before any work, also in array tasks
    prepare_job(layout, identity)
    wanted = ours.only_parts if ours.only_parts is not None else list(range(layout.num_parts))
    complete = [i for i in wanted if layout.is_complete(i)]
    todo = [] if ours.merge_only else [i for i in wanted if i not in complete]
    progress = Progress(layout, todo, total=len(wanted))
    print(f"[encoder.distributed] {layout.num_parts} parts in {layout.job_dir}: "
          f"{len(complete)}{'' if merge else f' of {len(wanted)} asked'} complete, "
          f"{len(todo)} to encode", file=sys.stderr, flush=True)
    if todo and ours.engine == "ray":
        run_ray(encoder_argv, layout, todo, progress, address=ours.address,
                cpus_per_part=ours.cpus_per_part, max_retries=ours.max_retries,
                ship_code=ours.ship_code)
    elif todo:
        run_local(encoder_argv, layout, todo, progress)
    for i, msg in sorted(progress.user_errors.items()):
        print(f"[encoder.distributed] part {i}: {msg} (see {layout.job_dir})", file=sys.stderr)
    for i, msg in sorted(progress.failed.items()):
        print(f"[encoder.distributed] part {i} failed: {msg}", file=sys.stderr)
    if progress.user_errors:
        return 2
    if progress.failed:
        again = sorted(set(progress.failed) - progress.deterministic)
        print(f"[encoder.distributed] {len(progress.failed)} part(s) failed "
              f"({compact(sorted(progress.failed))})"
              + (f"; re-run the same command for {compact(again)}: complete parts are skipped"
                 if again else "")
              + (f"; {compact(sorted(progress.deterministic))}: the cross-check failed, which a "
                 f"re-run repeats (see the message above)" if progress.deterministic else ""),
              file=sys.stderr)
        return 1
    if not merge:
        return 0
    out = merge_parts(layout, overwrite=enc.overwrite)
    secs = time.time() - progress.started
    phase = time.time() - progress.encode_started
    tokens, parts = progress.tokens_done, len(progress.done)
    print(f"[encoder.distributed] done: {parts} part(s) encoded, {progress.skipped} skipped, "
          f"{tokens:,} tokens in {secs:.1f} s ({parts / secs:.3f} parts/s, {tokens / secs:,.0f} "
          f"tokens/s); after start-up: {phase:.1f} s ({parts / phase:.3f} parts/s, "
          f"{tokens / phase:,.0f} tokens/s)", file=sys.stderr)
    print(f"merged {layout.num_parts} parts into {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except EncoderError as e:   # ours only: anything else is a bug and keeps its traceback
        print(f"encoder.distributed: error: {e}", file=sys.stderr)
        return exit_code(e)
    except ShardfmtError as e:  # merging the parts: a part that is not what its manifest says
        print(f"encoder.distributed: error: {e}", file=sys.stderr)
        return shardfmt_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
