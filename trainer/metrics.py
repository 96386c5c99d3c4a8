"""Rank-0 reporting: tqdm bar, JSONL log, optional TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


class Reporter:
    """Does nothing on ranks other than 0."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, initial_step: int,
                 tensorboard: bool):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "train_log.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                        mininterval=1.0)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

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
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    group = "eval" if key.startswith("eval") else "train"
                    self.tb.add_scalar(f"{group}/{key}", value, record["step"])
            self.tb.flush()

    def write(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
