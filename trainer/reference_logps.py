"""Precompute a reference model's log-probs for every pair of a preference dataset, once, so that
DPO/IPO training holds one model (`--precomputed_ref_logps`).

    python -m trainer.reference_logps --model_path M --data_path D [--data_path D2 ...]

writes D/reference_logps.npz beside the dataset's shards: `logps` (pairs x 2 float64: chosen,
rejected; pairs in dataset order) and `meta` (JSON: dataset and model hashes, precision,
attention). The trainer refuses the file if the dataset or the reference model's files changed, or
if it trains in another precision or attention implementation (the reference would then not equal
the starting policy). Runs on one GPU when there is one, else on the CPU.
Exit codes: 0 ok, 1 the run failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.args import ATTN_IMPLEMENTATIONS, PRECISIONS  # noqa: E402
from trainer.errors import OUR_ERRORS, RunError, UsageError, exit_code  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.reference_logps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the reference model (HF directory); use "
                   "the model DPO starts from")
    p.add_argument("--data_path", nargs="+", required=True, help="preference dataset dir(s); one "
                   "file is written into each")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="use the training run's precision")
    p.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return p


def compute(model, dataset, *, micro_batch_size: int, attn: str, flatten: bool, dtype,
            pad_id: int, device) -> "np.ndarray":
    """(pairs, 2) float64 log-probs of every pair, in dataset order."""
    import numpy as np
    import torch

    from trainer.data import model_inputs
    from trainer.preference import PairSource, collate_pairs, sequence_logps
    src = PairSource(dataset)
    out = np.zeros((src.num_pairs, 2), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(src), micro_batch_size):
            idx = range(start, min(start + micro_batch_size, len(src)))
            batch = collate_pairs([src[i] for i in idx], pad_id=pad_id, flatten=flatten)
            sums, _ = sequence_logps(model, model_inputs(batch, attn, dtype, device), batch)
            a, b = src.pair_start[idx[0]], src.pair_start[idx[-1] + 1]
            out[a:b] = sums.double().reshape(-1, 2).cpu().numpy()
    return out


def check_inputs(args: argparse.Namespace) -> list:
    """[(dataset dir, opened dataset)] for every --data_path; every problem at once as one
    UsageError, each naming its flag and the fix."""
    from shardfmt import open_dataset
    from shardfmt.errors import ShardfmtError
    from shardfmt.preference import is_preference
    from trainer.preference import REF_LOGPS_FILE
    problems = []
    if not (Path(args.model_path) / "config.json").is_file():
        problems.append(f"--model_path {args.model_path}: no config.json there")
    datasets = []
    for d in args.data_path:
        try:
            ds = open_dataset(d)
        except ShardfmtError as e:
            problems.append(f"--data_path {d}: {e}")
            continue
        if not is_preference(ds.manifest):
            problems.append(f"--data_path {d}: not a preference dataset (encode_type "
                            f"{ds.manifest.get('encode_type')!r})" + (
                                "; --objective kto computes its reference log-probs during "
                                "training (its KL pairs depend on each step's batch)"
                                if ds.manifest.get("encode_type") == "kto" else ""))
        elif (Path(d) / REF_LOGPS_FILE).exists() and not args.overwrite:
            problems.append(f"--data_path {d}: {REF_LOGPS_FILE} exists; pass --overwrite")
        datasets.append((Path(d), ds))
    if args.micro_batch_size < 1:
        problems.append("--micro_batch_size must be >= 1")
    if problems:
        raise UsageError("\n  ".join(["bad input:"] + problems))
    return datasets


def main(argv: list[str] | None = None) -> int:
    """0 ok, 2 bad input or usage (argparse exits 2 itself), 1 the run failed; a bug: traceback."""
    args = build_parser().parse_args(argv)
    try:
        _compute_all(args, check_inputs(args))
    except OUR_ERRORS as err:
        print(f"reference_logps: {err}", file=sys.stderr)
        return exit_code(err)
    return 0


def _compute_all(args: argparse.Namespace, datasets: list) -> None:
    import torch

    from trainer import model as mdl
    from trainer.data import FLATTENED_ATTENTION
    from trainer.preference import (REF_LOGPS_FILE, dataset_fingerprint, model_fingerprint,
                                    reference_precision, save_reference_file)
    started = time.time()
    dtype = mdl.resolve_precision(args.precision)
    attn = mdl.resolve_attn_implementation(args.attn_implementation, getattr(
        mdl.load_model_config(args.model_path), "model_type", None))
    model = mdl.load_training_model(args.model_path, from_scratch=False, dtype=dtype,
                                    attn_implementation=attn)
    model.eval()
    rows = model.get_input_embeddings().weight.shape[0]
    for path, ds in datasets:  # before any compute: ids past the embedding would crash mid-way
        if ds.max_token_id >= rows:
            raise UsageError(
                f"--data_path {path}: largest token id {ds.max_token_id} but {args.model_path} "
                f"has {rows} embedding rows (the data uses added tokens this model lacks). The "
                f"trainer builds a reference with those rows itself: train without "
                f"--precomputed_ref_logps, or pass the resized starting model here")
    tok = mdl.load_training_tokenizer(args.model_path)
    pad_id = 0 if tok is None or tok.pad_token_id is None else int(tok.pad_token_id)
    model_hash = model_fingerprint(args.model_path)
    # one GPU when there is one (fp32/bf16 forward of the whole set); CPU otherwise
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model.to(device)
    for path, ds in datasets:
        logps = compute(model, ds, micro_batch_size=args.micro_batch_size, attn=attn,
                        flatten=attn in FLATTENED_ATTENTION, dtype=dtype, pad_id=pad_id,
                        device=device)
        meta = {"dataset_hash": dataset_fingerprint(ds.manifest), "model_hash": model_hash,
                "model_path": str(args.model_path), "precision": reference_precision(dtype),
                "attn_implementation": attn, "pairs": int(len(logps))}
        try:
            save_reference_file(path / REF_LOGPS_FILE, logps, meta)
        except OSError as e:  # disk full, read-only dataset dir
            raise RunError(f"{path / REF_LOGPS_FILE}: writing failed ({type(e).__name__}: {e}); "
                           f"free space or make {path} writable, then rerun") from e
        print(f"wrote {path / REF_LOGPS_FILE}: {len(logps)} pairs")
    print(f"done in {time.time() - started:.1f}s")


if __name__ == "__main__":
    raise SystemExit(main())
