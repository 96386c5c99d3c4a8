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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

PROJECT = "llm-shards"  # the default wandb project / MLflow experiment


def metric_items(record: dict) -> dict[str, float]:
    """`{"train/loss": ..., "eval/eval_loss": ...}`: the record's numbers (bools and None dropped)."""
    group = "eval" if any(k.startswith("eval") for k in record) else "train"
    return {f"{group}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
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
    """Does nothing on ranks other than 0."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, initial_step: int,
                 trackers: list[str] = (), run_name: str = "run", config: dict | None = None):
        self.enabled = enabled
        self.bar = None
        self.jsonl = None
        self.trackers: list = []
        if not enabled:
            return
        self.jsonl = open(run_dir / "train_log.jsonl", "a", encoding="utf-8")
        for name in trackers:
            self.trackers.append(TRACKERS[name](run_dir, run_name, config or {}))
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
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        metrics = metric_items(record)
        for tracker in self.trackers:
            tracker.log(metrics, int(record["step"]))

    def write(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        for tracker in self.trackers:
            tracker.close()
