"""Export a training checkpoint as a plain Hugging Face model.

    python -m trainer.export --checkpoint runs/RUN/checkpoints/step_600 --output exported/
    python -m trainer.export --checkpoint RUN_DIR --output exported/          # the latest step
    python -m trainer.export --checkpoint CKPT --output exported/ --from_zero # ignore HF weights

What it handles, by what the checkpoint holds:
  * a LoRA adapter (adapter_config.json): the base model (from the adapter config or the run's
    --model_path; `--base` overrides) is resized to the checkpoint's tokenizer exactly as in
    training, given the run's --rope_scaling, the adapter is loaded and merged
    (`merge_and_unload`), tied embeddings stay tied. A QLoRA adapter (--quantization 4bit|8bit)
    is merged into the unquantised base (full precision), and the export reports the max logit
    difference between the merged model and the quantised base with its adapter (the
    quantisation error the merged model no longer has), printed and saved in export_report.json;
  * full weights (model.safetensors): re-saved (optionally in another dtype), loadable as is;
  * only a DeepSpeed ZeRO engine checkpoint (`--save_optimizer` runs, or `--from_zero`): the fp32
    weights are reassembled from the ZeRO shards (`get_fp32_state_dict_from_zero_checkpoint`).
The output always gets the tokenizer and `prompt_format.json`, so `trainer.generate` formats
prompts exactly like the encoder did. The output is written to a temp dir and renamed when
complete, and verified by loading it back with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/export.py` as well as `python -m trainer.export`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from shardfmt.writer import fsync_dir, fsync_tree
from trainer.checkpoint import DS_DIR, DS_TAG, PROMPT_FORMAT, read_state, resolve_checkpoint
from trainer.dtypes import PRECISION_DTYPES as DTYPES
from trainer.errors import (OUR_ERRORS, InputNotFoundError, OutputExistsError, RunError,
                            UsageError, exit_code)

REPORT = "export_report.json"



def _base_model_path(ckpt: Path, override: str | None) -> str:
    if override:
        return override
    adapter_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    for candidate in (adapter_cfg.get("base_model_name_or_path"),
                      read_state(ckpt).get("args", {}).get("model_path")):
        if candidate and Path(candidate, "config.json").is_file():
            return candidate
    raise InputNotFoundError(f"{ckpt}: cannot find the LoRA base model (adapter_config's "
                            f"base_model_name_or_path and the run's --model_path are gone); "
                            f"pass --base_model PATH")


def _run_args(ckpt: Path) -> dict:
    return read_state(ckpt).get("args", {}) if (ckpt / "trainer_state.json").is_file() else {}


def _base_for_adapter(ckpt: Path, base_path: str, *, dtype: torch.dtype, load_kwargs: dict):
    """The base model as the run trained it: the run's --rope_scaling, resized to its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trainer.rope import apply_rope_scaling, rope_summary
    run = _run_args(ckpt)
    config = AutoConfig.from_pretrained(base_path)
    if run.get("rope_scaling"):
        current = rope_summary(config) or {}
        if not (current.get("rope_type") == run["rope_scaling"]
                and current.get("factor") == run["rope_factor"]):
            config = apply_rope_scaling(config, kind=run["rope_scaling"], factor=run["rope_factor"],
                                        original_max_positions=run.get("original_max_positions"))
    base = AutoModelForCausalLM.from_pretrained(base_path, config=config, dtype=dtype, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    grow_like_training(base, ckpt, base_path, tokenizer)  # rows and init as in training
    return base, tokenizer


def merge_lora(ckpt: Path, *, base_model: str | None, dtype: torch.dtype):
    """Base resized to the checkpoint's tokenizer, adapter merged in: a plain model."""
    from peft import PeftModel
    base, tokenizer = _base_for_adapter(ckpt, _base_model_path(ckpt, base_model), dtype=dtype,
                                        load_kwargs={})
    model = PeftModel.from_pretrained(base, ckpt).merge_and_unload()
    return model, tokenizer


def quantized_logit_diff(ckpt: Path, merged, *, base_model: str | None, quantization: str,
                         precision: str, num_tokens: int = 64, seed: int = 0) -> float:
    """Max |logit| difference between `merged` and the quantised base + adapter (as trained), on
    two rows of `num_tokens` random token ids (seeded: the same numbers on every run)."""
    from peft import PeftModel

    from trainer.model import resolve_precision
    from trainer.quantize import load_kwargs
    compute = resolve_precision(precision or "auto")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    base, _ = _base_for_adapter(ckpt, _base_model_path(ckpt, base_model), dtype=compute,
                                load_kwargs=load_kwargs(quantization, compute, device))
    quantized = PeftModel.from_pretrained(base, ckpt).eval()
    vocab = merged.get_input_embeddings().weight.shape[0]
    limit = getattr(merged.config, "max_position_embeddings", None) or num_tokens
    ids = torch.randint(0, vocab, (2, min(num_tokens, limit)),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = merged.eval().to(device)(ids.to(device)).logits.float()
        got = quantized(ids.to(device)).logits.float()
    merged.to("cpu")
    return float((want - got).abs().max())


def grow_like_training(base, ckpt: Path, base_path: str, tokenizer) -> None:
    """Resize the LoRA base to the adapter's rows with the run's new-row init (trainer/vocab.py),
    so rows the adapter does not hold are what training started from."""
    from trainer.model import load_training_tokenizer
    from trainer.vocab import resize_like_training
    rows = base.get_input_embeddings().weight.shape[0]
    target = _adapter_vocab_rows(ckpt) or max(rows, len(tokenizer))
    resolved = ckpt / "resolved_config.json"
    resolved = json.loads(resolved.read_text()) if resolved.is_file() else None
    if target > rows:
        resize_like_training(base, resolved, rows=target, model_tokenizer=load_training_tokenizer(base_path),
                             tokenizer=tokenizer)
    elif target < rows:
        base.resize_token_embeddings(target, mean_resizing=False)


def _adapter_vocab_rows(ckpt: Path) -> int | None:
    """Embedding rows the adapter was trained with (its config.json, saved with the adapter)."""
    cfg = ckpt / "config.json"
    return json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None


def load_from_zero(ckpt: Path, *, dtype: torch.dtype):
    """Reassemble full fp32 weights from a ZeRO-2/3 engine checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ds_dir = ckpt / DS_DIR
    if not (ds_dir / DS_TAG).is_dir():
        raise InputNotFoundError(f"{ckpt}: no DeepSpeed engine checkpoint in {ds_dir}/{DS_TAG} "
                                f"(train with --save_optimizer to keep one)")
    if (ckpt / "adapter_config.json").is_file():
        raise UsageError(f"{ckpt}: a LoRA run's engine checkpoint holds only the adapter; export "
                         f"the adapter instead (drop --from_zero)")
    config_dir = ckpt if (ckpt / "config.json").is_file() else \
        read_state(ckpt)["args"]["model_path"]
    config = AutoConfig.from_pretrained(config_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UsageError(f"{ckpt}: ZeRO weights do not fit the model config (missing "
                         f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    return model.to(dtype), AutoTokenizer.from_pretrained(ckpt)


def full_model(ckpt: Path, *, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype),
            AutoTokenizer.from_pretrained(ckpt))


def export(checkpoint: str | Path, output: str | Path, *, base_model: str | None = None,
           dtype: str = "fp32", from_zero: bool = False, overwrite: bool = False) -> Path:
    """Write `output/` (model + tokenizer + prompt format) from a checkpoint or run directory."""
    ckpt = resolve_checkpoint(checkpoint, flag="--checkpoint")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--output {out} exists and is not empty; pass --overwrite")
    torch_dtype = DTYPES[dtype]
    report: dict | None = None
    if from_zero or not any((ckpt / n).is_file() for n in ("model.safetensors",
                                                         "adapter_config.json",
                                                         "model.safetensors.index.json")):
        model, tokenizer = load_from_zero(ckpt, dtype=torch_dtype)
    elif (ckpt / "adapter_config.json").is_file():
        model, tokenizer = merge_lora(ckpt, base_model=base_model, dtype=torch_dtype)
        run = _run_args(ckpt)
        if run.get("quantization"):
            report = {"checkpoint": str(ckpt), "quantization": run["quantization"],
                      "merged_into": _base_model_path(ckpt, base_model),
                      "max_logit_diff_merged_vs_quantized": quantized_logit_diff(
                          ckpt, model, base_model=base_model, quantization=run["quantization"],
                          precision=run.get("precision", "auto"))}
    else:
        model, tokenizer = full_model(ckpt, dtype=torch_dtype)
    tmp = out.with_name(out.name + ".tmp")
    try:
        _write_export(tmp, out, model, tokenizer, ckpt=ckpt, report=report)
    except OSError as e:  # disk full, unwritable: the output is left absent, never half written
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"--output {out}: writing the export failed ({type(e).__name__}: {e}); "
                       f"nothing was written there. Free space or pick another --output") from e
    return out


def _write_export(tmp: Path, out: Path, model, tokenizer, *, ckpt: Path, report: dict | None) -> None:
    """Everything into `tmp`, checked by loading it back, then renamed onto `out`."""
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if (ckpt / PROMPT_FORMAT).is_file():
        shutil.copy2(ckpt / PROMPT_FORMAT, tmp / PROMPT_FORMAT)
    if report is not None:
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    _check_loads(tmp, model)
    fsync_tree(tmp)  # on disk before the rename publishes it (one fsync per file, ~10)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)  # the rename itself is durable


def _check_loads(path: Path, model) -> None:
    """The export must load back with plain transformers and give the same weights."""
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype)
    want = model.state_dict()
    for name, tensor in again.state_dict().items():
        if not torch.equal(tensor, want[name]):
            raise RunError(f"{path}: exported tensor {name} differs after reloading (a transformers/safetensors round-trip problem; the export was not published)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoints/step_N dir or a run dir")
    ap.add_argument("--output", required=True, help="directory for the Hugging Face model")
    ap.add_argument("--base", "--base_model", dest="base_model",
                    help="LoRA/QLoRA: the full-precision base model dir to merge into (default: the "
                    "run's --model_path)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--from_zero", action="store_true",
                    help="rebuild weights from the DeepSpeed ZeRO engine checkpoint")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, base_model=args.base_model, dtype=args.dtype,
                     from_zero=args.from_zero, overwrite=args.overwrite)
    except OUR_ERRORS as err:  # 2: bad checkpoint/flags, 1: the export failed; a bug: traceback
        print(f"export: error: {err}", file=sys.stderr)
        return exit_code(err)
    if (out / REPORT).is_file():
        report = json.loads((out / REPORT).read_text())
        print(f"{report['quantization']} adapter merged into the unquantised base "
              f"{report['merged_into']}: max |logit difference| merged vs quantised+adapter = "
              f"{report['max_logit_diff_merged_vs_quantized']:.4g}")
    print(f"exported {args.checkpoint} -> {out} (load with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
