"""Train a causal LM on shardfmt datasets with DeepSpeed (full fine-tune or LoRA).

    deepspeed --num_gpus 2 trainer/train.py --model_path M --data_path D --output_path OUT --max_steps 100
    torchrun --nproc_per_node 2 trainer/train.py ...        python trainer/train.py ...   (1 process)

The command line: flags parsed and checked (every problem at once) before torch, transformers or
DeepSpeed is imported; then the recipe (trainer/recipe.py: `Trainer`, set-up steps and loop) runs.
Exit codes: 0 ok, 1 the run failed, 2 bad input or usage (trainer/errors.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, _root)

import logging
import os

from trainer.args import parse_and_validate
from trainer.errors import EXIT_RUN_FAILED, OUR_ERRORS, exit_code


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """0 ok, 1 the run failed, 2 bad input or usage (argparse and validate_args exit 2 themselves).

    Only our own errors (trainer/errors.py, shardfmt/errors.py) become one-line messages; anything
    else is a bug and keeps its traceback. Before step 1 the error's kind picks 2 or 1; after it,
    every failure is "the run failed" (1). Every rank returns its own code: errors found before
    step 1 come from the same flags and files on every rank, and a failed checkpoint save is
    agreed on by all ranks (trainer/checkpoint.py), so the launcher sees the same code from all.
    """
    args = parse_and_validate(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    from trainer import console
    console.install(is_main=is_main)
    _setup_logging()
    if is_main:
        from shardfmt.run_config import format_resolved
        source = f"--config {args.config} + command line" if args.config else "command line"
        print(format_resolved(args.to_dict(), title=f"trainer: resolved flags ({source}):"),
              file=sys.stderr, flush=True)
    from trainer.recipe import Trainer  # torch, transformers, DeepSpeed: after the flags passed
    from trainer.dist import lone_process_env
    os.environ.update(lone_process_env(os.environ))  # a lone process: DeepSpeed reads these
    try:
        trainer = Trainer(args)
    except OUR_ERRORS as e:
        print(f"trainer: error before step 1: {e}", file=sys.stderr)
        return exit_code(e)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from trainer.checkpoint import latest_checkpoint_name
    try:  # log lines go above the progress bar instead of through it
        with logging_redirect_tqdm(loggers=[logging.root, logging.getLogger(console.DS_LOGGER)]):
            trainer.run()
    except OUR_ERRORS as e:  # e.g. CheckpointSaveError: disk full / file too large / unwritable
        latest = latest_checkpoint_name(trainer.run_dir / "checkpoints")
        then = (f"checkpoints/latest names {latest} (complete): resume with --load_ckpt_path "
                f"{trainer.run_dir}") if latest else "no checkpoint was saved yet: run again"
        print(f"trainer: error at step {trainer.state.step}: {e}; {then}", file=sys.stderr)
        return EXIT_RUN_FAILED  # once training started, any failure of ours is "the run failed"
    from trainer.dist import shut_down
    shut_down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
