"""What the trainer prints: one line per warning kind, known library noise silenced, and log lines
that do not break the progress bar. Installed once by `trainer.train.main` (process-wide settings:
warning filters and logging filters; library code never calls this).

KNOWN_NOISE lists each message the user cannot act on with the reason it is safe to drop;
everything else is shown, at most once per kind.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

DS_LOGGER = "DeepSpeed"  # deepspeed.utils.logging's logger name


@dataclass(frozen=True)
class Noise:
    source: str  # a logger name, or "warnings"
    pattern: str  # re.search on the message
    why: str


KNOWN_NOISE = (
    Noise(DS_LOGGER, r"Setting accelerator to CPU",
          "DeepSpeed on a machine without GPU says so at import; the run line shows the device"),
    Noise(DS_LOGGER, r"Attempting to get learning rate from scheduler before it has started",
          "DeepSpeed's Warmup* schedules log this once when built (before step 1), by design"),
    Noise(DS_LOGGER, r"total_num_steps \d+ is less than warmup_num_steps",
          "short runs with a DeepSpeed schedule; the schedule line already shows both numbers"),
    Noise(DS_LOGGER, r"Removing param_group that has no 'params'|DeepSpeed Basic Optimizer|"
          r"Using client Optimizer|Using client LR scheduler|DeepSpeed LR Scheduler|"
          r"\[Torch\] Checkpoint|Saving model checkpoint|bf16_zero_to_fp32|"
          r"Checkpoint .* is ready now|zero_to_fp32",
          "engine set-up and checkpoint chatter; the trainer logs the optimizer, schedule and saves"),
    Noise("warnings", r"torch\.utils\._pytree\._register_pytree_node is deprecated|"
          r"`torch\.cuda\.amp\..*` is deprecated|TypedStorage is deprecated",
          "deprecations inside DeepSpeed/transformers, not in the user's code"),
    Noise("warnings", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
          r"deprecated", "called inside DeepSpeed's ZeRO, not by the user's code"),
    Noise("warnings", r"`torch\.jit\.script_method` is deprecated",
          "raised while importing a library that still uses TorchScript, not by the user's code"),
    Noise("warnings", r"The ``noload`` loader strategy is deprecated",
          "SQLAlchemy inside MLflow's local store"),
    Noise("warnings", r"To copy construct from a tensor, it is recommended",
          "raised inside DeepSpeed's ZeRO partitioning"),
    Noise("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward",
          "an optional faster CPU kernel for 4-bit inference (GPU runs never load it); the "
          "fallback is exact"),
    Noise("mlflow.store.db.utils", r".", "MLflow creating its SQLite tables: routine"),
    Noise("alembic.runtime.migration", r".", "MLflow's schema migrations: routine"),
)


class DropKnownNoise(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern is None or not self.pattern.search(record.getMessage())


class OncePerKind(logging.Filter):
    """Pass the first record of each kind (logger, level, message template); drop repeats."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True  # progress lines (INFO) are expected to repeat with new numbers
        kind = (record.name, record.levelno, str(record.msg))
        if kind in self.seen:
            return False
        self.seen.add(kind)
        return True


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {str(message).strip().splitlines()[0]} ({filename}:{lineno})\n"


def install(*, is_main: bool) -> None:
    """Filters for the whole process. Ranks other than 0 keep only errors from the libraries
    (every rank would repeat rank 0's warnings)."""
    # simplefilter first: filterwarnings() puts each "ignore" in front of it
    warnings.simplefilter("default" if is_main else "ignore")  # default = once per location (kind)
    by_logger: dict[str, list[str]] = {}
    for noise in KNOWN_NOISE:
        if noise.source == "warnings":
            warnings.filterwarnings("ignore", message=f".*(?:{noise.pattern})")
        else:
            by_logger.setdefault(noise.source, []).append(noise.pattern)
    once = OncePerKind()
    for name, patterns in by_logger.items():
        lg = logging.getLogger(name)
        lg.addFilter(DropKnownNoise(patterns))
        lg.addFilter(once)
    for name in ("", "transformers", "trainer"):
        logging.getLogger(name).addFilter(once)
    warnings.formatwarning = _one_line_warning
    if not is_main:
        for name in (DS_LOGGER, "transformers", "torch", "mlflow", "wandb"):
            logging.getLogger(name).addFilter(lambda r: r.levelno >= logging.ERROR)
    import transformers.utils.logging as hf_logging
    hf_logging.set_verbosity_warning()
    if not is_main:
        hf_logging.disable_progress_bar()  # one "Loading weights" bar, not one per rank


def known_noise_doc() -> str:
    return "\n".join(f"  [{n.source}] /{n.pattern}/: {n.why}" for n in KNOWN_NOISE)
