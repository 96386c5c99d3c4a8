"""Rank-0 reporting: tqdm bar, JSONL log, and any subset of TensorBoard, Weights & Biases, MLflow.

Every tracker gets the same records as train_log.jsonl (numeric values, keyed `train/<name>` or
`eval/<name>` at the record's step), the run name `--save_name`, and the resolved config (args,
DeepSpeed config, optimizer and schedule) once at the start.
  tensorboard  RUN/tensorboard/ (the config as a text summary)
  wandb        wandb.init(project=$WANDB_PROJECT or "llm-shards", dir=RUN, name=save_name, config=...);
               WANDB_MODE=offline writes RUN/wandb/offline-run-*/ for `wandb sync`
  mlflow       $MLFLOW_TRACKING_URI, else the local store sqlite:///RUN/mlflow.db (artifacts in
               RUN/mlflow_artifacts/); experiment
               $MLFLOW_EXPERIMENT_NAME or "llm-shards"; flat args as params, the whole config as
               the artifact resolved_config.json

A failed write (OSError: disk full, permission denied, the run directory removed) of any of these
files raises ReportWriteError naming the file and the fix; the log keeps only whole lines (a
partly written one is cut off again), so a resumed run appends to a valid JSONL file.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from tqdm import tqdm

from trainer.errors import ReportWriteError

LOG_NAME = "train_log.jsonl"
T = TypeVar("T")

PROJECT = "llm-shards"  # the default wandb project / MLflow experiment


def metric_items(record: dict) -> dict[str, float]:
    """`{"train/loss": ..., "eval/eval_loss": ...}`: the record's numbers (bools and None dropped)."""
    group = "eval" if any(k.startswith("eval") for k in record) else "train"
    return {f"{group}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_failure(path: Path | str, e: OSError) -> ReportWriteError:
    """Ours for a failed write of a report file: the file, the OS's reason and the fix."""
    code = errno.errorcode.get(e.errno) if e.errno else None
    reason = f"{e.strerror or e}" + (f" [{code}]" if code else "")
    parent = Path(str(path)).parent
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = "free space on its disk (or raise the quota / file-size limit)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {parent} writable for this user"
    elif e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        fix = f"{parent} was removed or replaced while the run ran: restore it"
    else:
        fix = "check that disk (an I/O error)"
    return ReportWriteError(f"writing {path} failed: {reason}; {fix}")


def guarded(path: Path | str, work: Callable[[], T]) -> T:
    """`work()`, its OSError turned into ReportWriteError about `path`."""
    try:
        return work()
    except OSError as e:
        raise write_failure(path, e) from e


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the O_APPEND file `fd` whole, or not at all: a write that fails part-way
    (a full disk takes what fits, then refuses) is cut back, so the file stays whole JSONL lines."""
    start = os.lseek(fd, 0, os.SEEK_END)
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # the error being raised says what failed; the truncate was a courtesy
        raise


class TensorBoardTracker:
    @staticmethod
    def location(run_dir: Path) -> str:
        return str(run_dir / "tensorboard")

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    @staticmethod
    def location(run_dir: Path) -> str:
        return str(run_dir / "wandb")

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name,
                              dir=str(run_dir), config=json.loads(json.dumps(config, default=str)),
                              reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    @staticmethod
    def location(run_dir: Path) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or str(run_dir / "mlflow.db")

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import mlflow
        self.mlflow = mlflow
        # MLflow 3 refuses a plain-directory store unless MLFLOW_ALLOW_FILE_STORE=true; its local
        # default is one SQLite file.
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        # the local store's artifacts go beside it (MLflow's default is ./mlruns in the cwd)
        artifacts = None if uri else (run_dir / "mlflow_artifacts").resolve().as_uri()
        uri = uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=artifacts)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in _flat(config.get("args", {}))]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, json.loads(json.dumps(config, default=str)),
                             "resolved_config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self.mlflow.entities.Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


class Reporter:
    """Does nothing on ranks other than 0. Every file write raises ReportWriteError on failure."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, initial_step: int,
                 trackers: list[str] = (), run_name: str = "run", config: dict | None = None):
        self.enabled = enabled
        self.bar = None
        self.fd: int | None = None
        self.log_path = run_dir / LOG_NAME
        self.trackers: list[tuple[str, Any]] = []  # (where it writes, tracker)
        if not enabled:
            return
        try:
            self.fd = guarded(self.log_path, lambda: os.open(
                self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
            for name in trackers:
                where = TRACKERS[name].location(run_dir)
                self.trackers.append((where, guarded(where, lambda: TRACKERS[name](
                    run_dir, run_name, config or {}))))
        except BaseException:
            self.close(quiet=True)
            raise
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                        mininterval=1.0, position=0)

    def step(self, loss: float, lr: float, tokens_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}",
                                 refresh=False)
            self.bar.update(1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode("utf-8")
        guarded(self.log_path, lambda: append_whole(self.fd, line))
        metrics = metric_items(record)
        for where, tracker in self.trackers:
            guarded(where, lambda: tracker.log(metrics, int(record["step"])))

    def write(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self, *, quiet: bool = False) -> None:
        """Close everything (each once), then raise the first failure unless `quiet` (an error
        is already on its way: a failing close must not replace it)."""
        first = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        closers = [(str(self.log_path), lambda fd=self.fd: os.close(fd))] if self.fd is not None else []
        closers += [(where, tracker.close) for where, tracker in self.trackers]
        self.fd, self.trackers = None, []
        for where, close in closers:
            try:
                guarded(where, close)
            except ReportWriteError as e:
                first = first or e
        if first is not None and not quiet:
            raise first
