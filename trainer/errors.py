"""Every error the trainer raises on purpose, under one root, so its CLIs catch one family.

    TrainerError
      UsageError              bad input or usage, found before step 1: a flag, a path, a config,
                              data that does not fit the model            -> exit 2
        ConfigError           a DeepSpeed / LoRA / optimizer config that cannot be used
        InputNotFoundError    a flag names a missing path, or one without what it must hold
          CheckpointNotFoundError  --load_ckpt_path / --checkpoint: no complete checkpoint there
        OutputExistsError     the output exists and no --overwrite was given
        DataModelMismatch     the dataset does not fit the model or tokenizer (trainer/model.py)
        VocabMismatch         the data tokenizer does not extend the model's (trainer/vocab.py)
        LoraTargetError       target_modules names nothing the model has (trainer/lora.py)
        RopeScalingError      --rope_scaling on a model it cannot apply to (trainer/rope.py)
      RunError                the run failed after it started                     -> exit 1
        CheckpointSaveError   writing a checkpoint failed (disk full, unwritable); `latest` untouched
        ReportWriteError      writing the run's log, metrics, plots or tracker files failed

The CLIs (trainer/train.py, trainer.export, trainer.generate, trainer.reference_logps) catch
these and shardfmt.errors.ShardfmtError only (trainer.generate also encoder.errors.EncoderError:
it formats prompts with the encoder); anything else is a bug and keeps its traceback.
Each also subclasses the builtin it used to be (ValueError, FileNotFoundError, RuntimeError), so
older `except ValueError:` code keeps working. Every message names the flag, file or row and the fix.
"""

from __future__ import annotations

# The exit codes (README "Exit codes") have their home in shardfmt.errors (trainer depends on it)
from shardfmt.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED, ShardfmtError  # noqa: F401
from shardfmt.errors import exit_code as shardfmt_exit_code


class TrainerError(Exception):
    """Root of the trainer's own errors."""

    exit_code = EXIT_RUN_FAILED


class UsageError(TrainerError, ValueError):
    """Bad input or usage: a flag, a path, a config or data the run cannot start with."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(UsageError):
    """A DeepSpeed, LoRA or optimizer configuration that cannot be used as given."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """A flag names a path that does not exist or lacks what it must hold."""


class CheckpointNotFoundError(InputNotFoundError):
    """A checkpoint path that names no complete checkpoint (deleted, incomplete, or a typo)."""


class OutputExistsError(UsageError, FileExistsError):
    """The output path already holds something, and nothing is overwritten without a flag."""


class DataModelMismatch(UsageError):
    """The dataset does not fit the model or tokenizer (raised before step 1)."""


class VocabMismatch(UsageError):
    """The data tokenizer does not extend the model's tokenizer (base ids moved)."""


class LoraTargetError(UsageError):
    """target_modules in --lora_config_path names nothing the model has."""


class RopeScalingError(UsageError):
    """--rope_scaling on a model it cannot apply to."""


class RunError(TrainerError, RuntimeError):
    """The run started and then failed (exit 1); the message says what is safe to resume from."""

    exit_code = EXIT_RUN_FAILED


class CheckpointSaveError(RunError):
    """Writing a checkpoint failed (disk full, file too large, unwritable); `latest` is untouched."""


class ReportWriteError(RunError):
    """Writing train_log.jsonl, a tracker's files (TensorBoard, W&B, MLflow) or a plot failed
    mid-run (disk full, permission denied, the run directory removed); checkpoints untouched."""


# What the CLIs catch: ours and shardfmt's (a dataset that is missing, incomplete or corrupt).
OUR_ERRORS: tuple[type[Exception], ...] = (TrainerError, ShardfmtError)


def exit_code(error: Exception) -> int:
    """The one mapping of an error the trainer CLIs catch to the convention: 2 bad input or usage,
    1 the run failed (shardfmt's own mapping for its errors: a corrupt shard is 1)."""
    if isinstance(error, TrainerError):
        return error.exit_code
    if isinstance(error, ShardfmtError):
        return shardfmt_exit_code(error)
    return EXIT_RUN_FAILED
