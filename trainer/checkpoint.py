"""Run directory, checkpoint writing (atomic, `latest` last, pruning) and resume state.

Layout:
  OUTPUT/<timestamp>_<save_name>/
    train_log.jsonl, tensorboard/
    checkpoints/latest                       text file naming the newest complete step_<N>
    checkpoints/step_<N>/
      model.safetensors + config.json        (full fine-tune; AutoModelForCausalLM.from_pretrained)
      adapter_model.safetensors + adapter_config.json   (LoRA; PeftModel.from_pretrained)
      tokenizer files, trainer_state.json, resolved_config.json, loss_curve.png,
      prompt_format.json                     the data's template + special-token policy
      rng/rank_<r>.json                      every rank's RNG state (JSON, no pickle)
      deepspeed/ds/...                       --save_optimizer: DeepSpeed engine checkpoint
A checkpoint is written under checkpoints/.tmp_step_<N>, fsynced (every file and directory) and
renamed when complete; `latest` is rewritten (durably) after the rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from shardfmt.writer import fsync_dir, fsync_tree, write_json_atomic, write_text_atomic
from trainer.dist import DistInfo, all_reduce_sum, barrier, broadcast_text
from trainer.errors import CheckpointNotFoundError, CheckpointSaveError

STATE_NAME = "trainer_state.json"
PROMPT_FORMAT = "prompt_format.json"
DS_DIR, DS_TAG = "deepspeed", "ds"
STEP_RE = re.compile(r"^step_(\d+)$")


def make_run_dir(output_path: str, save_name: str, no_timestamp: bool, info: DistInfo) -> Path:
    """OUTPUT/<timestamp>_<save_name>: the timestamp is chosen on rank 0 and broadcast."""
    stamp = time.strftime("%Y%m%d-%H%M%S") if info.is_main else ""
    stamp = broadcast_text(stamp, info.device)
    run_dir = Path(output_path) / (save_name if no_timestamp else f"{stamp}_{save_name}")
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    barrier()
    return run_dir


def resolve_checkpoint(path: str | Path, *, flag: str = "--load_ckpt_path") -> Path:
    """A checkpoint dir from a checkpoint dir, a run dir, or a run's checkpoints/ dir; `flag`
    names the option it came from in the error."""
    p = Path(path)
    if (p / STATE_NAME).is_file():
        return p
    for pointer in (p / "checkpoints" / "latest", p / "latest"):
        if pointer.is_file():
            ckpt = pointer.parent / pointer.read_text().strip()
            if not (ckpt / STATE_NAME).is_file():
                raise CheckpointNotFoundError(f"{flag} {path}: {pointer} names {ckpt.name}, "
                                        f"which has no {STATE_NAME} (deleted or incomplete)")
            return ckpt
    raise CheckpointNotFoundError(f"{flag} {path}: neither a checkpoint dir (no {STATE_NAME}) "
                            f"nor a run dir (no checkpoints/latest). Point it at "
                            f"OUTPUT/<run>/ or OUTPUT/<run>/checkpoints/step_<N>/.")


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_NAME).read_text())


def prompt_format_of(manifests: list[dict]) -> dict | None:
    """The training data's prompt format (encoder metadata) from the first qa/chat manifest."""
    for m in manifests:
        meta = m.get("metadata", {})
        enc = meta.get("encoder", {})
        if m.get("encode_type") in ("qa", "chat", "preference", "kto") and enc.get("template"):
            # preference pairs: prompts are chat messages, formatted by the same template
            kind = "chat" if m["encode_type"] in ("preference", "kto") else m["encode_type"]
            return {"encode_type": kind, "template": enc["template"],
                    "max_length": m.get("max_length"),
                    "special_tokens": meta.get("special_tokens")}
    return None


# ---------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                       float(np_state[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def load_rng(ckpt: Path, rank: int) -> bool:
    path = ckpt / "rng" / f"rank_{rank}.json"
    if not path.is_file():
        return False
    set_rng_state(json.loads(path.read_text()))
    return True


# ---------------------------------------------------------------------------------- saving
def _write_json(path: Path, obj: dict) -> None:
    """Durable (tmp + fsync + rename + directory fsync): shardfmt's writer, the one such writer."""
    write_json_atomic(path, obj, default=str)


def save_hf_weights(engine, tmp: Path, info: DistInfo, zero3: bool) -> None:
    """HF safetensors (model or PEFT adapter). ZeRO-3: gathered 16-bit weights (all ranks gather)."""
    module = engine.module
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if info.is_main:
        kwargs = {"state_dict": state_dict} if zero3 else {}
        with _no_hf_progress_bars():  # "Writing model shards" would cut through the training bar
            module.save_pretrained(str(tmp), safe_serialization=True, **kwargs)


@contextlib.contextmanager
def _no_hf_progress_bars():
    import transformers.utils.logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def plot_loss_curve(history: list[dict], eval_history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    if eval_history:
        ax.plot([h["step"] for h in eval_history], [h["eval_loss"] for h in eval_history], "o-",
                label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over loss tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_checkpoint(**kwargs) -> Path:
    """Write checkpoints/step_<step>/ completely, then rename it into place and update `latest`.

    Must be called on every rank (ZeRO gathers and engine shards are collective). A failed write
    (OSError; safetensors reports it as SafetensorError) raises CheckpointSaveError on every rank;
    any other exception is a bug and propagates as it is (after every rank agreed to stop).
    """
    try:
        return _save_checkpoint(**kwargs)
    except CheckpointSaveError as e:  # another rank failed (see _agree)
        raise CheckpointSaveError(f"saving checkpoint step_{kwargs['step']} failed: {e}") from e
    except (OSError, SafetensorError) as e:
        raise CheckpointSaveError(f"saving checkpoint step_{kwargs['step']} failed: "
                                  f"{type(e).__name__}: {e}") from e


def _agree(error: BaseException | None, *, phase: str, device) -> None:
    """End a save phase on every rank together: one all-reduce of "did I fail" (it is also the
    barrier), then every rank raises if any failed. A plain barrier would leave the other ranks
    waiting forever (until the launcher's timeout) for a rank that gave up."""
    failed = all_reduce_sum([0.0 if error is None else 1.0], device)[0]
    if error is not None:
        raise error
    if failed:
        raise CheckpointSaveError(f"{int(failed)} other rank(s) failed while {phase} (their own "
                                  f"error is in their log)")


def _save_checkpoint(*, engine, tokenizer, run_dir: Path, step: int, state: dict, resolved: dict,
                     info: DistInfo, zero3: bool, save_optimizer: bool, use_lora: bool,
                     save_total_limit: int, prompt_format: dict | None = None) -> Path:
    ckpt_root = run_dir / "checkpoints"
    tmp = ckpt_root / f".tmp_step_{step}"
    final = ckpt_root / f"step_{step}"
    device = info.device

    def phase(name: str, work) -> None:
        error = None
        try:
            work()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it (else they hang);
            # _agree re-raises it unchanged on this rank, so a bug keeps its type and traceback
            error = e
        _agree(error, phase=name, device=device)

    def prepare() -> None:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)

    def write_weights() -> None:  # ZeRO-3: every rank gathers, rank 0 writes
        save_hf_weights(engine, tmp, info, zero3)

    def write_engine_state() -> None:  # collective inside DeepSpeed: every rank writes its shard
        if save_optimizer:
            engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, client_state={"step": step},
                                   exclude_frozen_parameters=use_lora)
            # every rank: its own shards are on disk even when ranks run on other nodes (rank 0's
            # fsync_tree below then finds them clean; a clean file's fsync is ~free)
            fsync_tree(tmp / DS_DIR)
        _write_json(tmp / "rng" / f"rank_{info.rank}.json", rng_state())

    def publish() -> None:
        if not info.is_main:
            return
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_json(tmp / "resolved_config.json", resolved)
        if prompt_format:  # for trainer.generate / trainer.export: format prompts like the data
            _write_json(tmp / PROMPT_FORMAT, prompt_format)
        plot_loss_curve(state["loss_history"], state.get("eval_history", []), tmp / "loss_curve.png")
        _write_json(tmp / STATE_NAME, state)  # last file inside the checkpoint
        # weights, tokenizer, plot and engine shards went through the page cache: on disk before
        # the rename publishes them (one fsync per file and directory, ~20-40 for a checkpoint)
        fsync_tree(tmp)
        if final.exists():
            trash = ckpt_root / f".trash_step_{step}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)  # the rename is durable before `latest` names it
        write_text_atomic(ckpt_root / "latest", final.name + "\n")  # written last, durably
        if save_total_limit:
            prune_checkpoints(ckpt_root, save_total_limit)

    phase("preparing the checkpoint directory", prepare)
    phase("writing the model weights", write_weights)
    phase("writing the engine state", write_engine_state)
    phase("completing the checkpoint", publish)
    return final


def latest_checkpoint_name(ckpt_root: Path) -> str | None:
    """The name `checkpoints/latest` holds (a complete checkpoint), or None."""
    pointer = ckpt_root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(ckpt_root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").is_file() else None
    doomed = [p for p in list_checkpoints(ckpt_root)[:-keep] if p.name != latest]
    for p in doomed:
        trash = p.with_name(".trash_" + p.name)
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed
