"""`python -m shardfmt {inspect,verify,export-megatron,merge}`: look at, check and convert datasets.

    python -m shardfmt inspect out/corpus [--json] [--tokenizer PATH --show 3]
    python -m shardfmt verify out/corpus            # exit 0 = intact, 1 = problems (listed):
                                                    # checksums, index, preference pairs, doc flags

Exit codes (all subcommands): 0 ok; 1 the run failed (verify: the data does not match its
checksums or index, or a file of it is missing; any other subcommand: a shard found corrupt); 2
bad input or usage (a bad flag, a path that names no dataset, a dataset whose encode never
finished, an output that already exists without --overwrite). Only
shardfmt's own errors (shardfmt.errors) are caught: anything else is a bug and keeps its traceback.
    python -m shardfmt export-megatron out/corpus megatron/corpus_text_document
    python -m shardfmt merge part0/corpus part1/corpus all/corpus

Wherever a dataset is expected, a Megatron-LM prefix (PREFIX for PREFIX.bin/.idx) or a directory
of Megatron .bin/.idx pairs works too (merge excepted: it joins encoder --part outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from shardfmt.errors import ShardfmtError, exit_code
from shardfmt.protocol import TokenDataset
from shardfmt.sources import open_dataset, path_kind
from shardfmt.verify import verify_dataset


def dataset_summary(ds: TokenDataset) -> dict:
    """Counts, length percentiles (and loss fraction where known) of any dataset kind."""
    return ds.summary()


def render_sample(ids: np.ndarray, mask: np.ndarray, doc_lens: np.ndarray, decode) -> str:
    """Decoded text with trained spans in [[...]] and `‖` between documents."""
    out, pos = [], 0
    for n in doc_lens.tolist():
        pieces, run, run_mask = [], [], None
        for tid, m in zip(ids[pos:pos + n].tolist(), mask[pos:pos + n].tolist()):
            if run and m != run_mask:
                pieces.append(_mark(decode(run), run_mask))
                run = []
            run.append(tid)
            run_mask = m
        if run:
            pieces.append(_mark(decode(run), run_mask))
        out.append("".join(pieces))
        pos += n
    return " ‖ ".join(out)


def _mark(text: str, trained: bool) -> str:
    return f"[[{text}]]" if trained else text


def _load_decoder(ds: TokenDataset, tokenizer_path: str | None):
    manifests = ds.manifests
    candidates = [tokenizer_path] if tokenizer_path else [
        str(Path(ds.paths[0]) / "tokenizer"),
        manifests[0]["tokenizer"].get("path") if manifests else None]
    for path in filter(None, candidates):
        if Path(path).exists():
            from transformers import AutoTokenizer  # optional: only for --show
            tok = AutoTokenizer.from_pretrained(path)
            return lambda ids: tok.decode(ids, skip_special_tokens=False)
    return lambda ids: "".join(f"{i} " for i in ids)


def cmd_inspect(args: argparse.Namespace) -> int:
    ds = open_dataset(args.dirs)
    summary = dataset_summary(ds)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if args.show:
        decode = _load_decoder(ds, args.tokenizer)
        for i in range(min(args.show, len(ds))):
            s = ds[i]
            print(f"\n--- sample {i}: {len(s.input_ids)} tokens, docs {s.doc_lens.tolist()}, "
                  f"{int(s.loss_mask.sum())} trained ([[...]]) ---")
            print(render_sample(s.input_ids, s.loss_mask, s.doc_lens, decode))
    return 0


def _print_summary(summary: dict, indent: int = 0) -> None:
    """key: value lines; the parts of a concatenation indented below it."""
    pad = " " * indent
    for key, value in summary.items():
        if key != "parts":
            print(f"{pad}{key:>14}: {value}")
    for k, part in enumerate(summary.get("parts", [])):
        print(f"{pad}{'part ' + str(k):>14}:")
        _print_summary(part, indent + 4)


def cmd_verify(args: argparse.Namespace) -> int:
    """0 intact; 1 the data does not match its checksums/index, or a file of it is missing or
    unfinished (each problem listed). A path that names no dataset at all is bad input: raised,
    so main() exits 2."""
    for path in args.dirs:
        path_kind(path)   # DatasetNotFoundError: nothing there to verify
    try:
        ds = open_dataset(args.dirs)  # header and size checks of every file
        problems = verify_dataset(ds)  # + preference pairs, doc_flags and the KTO count
    except ShardfmtError as err:
        problems = [str(err)]
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        parts = _leaves(ds)
        checked = sorted({_VERIFIED[p.kind] for p in parts})
        print(f"OK {len(ds)} samples, {ds.num_tokens} tokens, {len(parts)} part(s): "
              + "; ".join(checked))
    return 1 if problems else 0


def _leaves(ds: TokenDataset) -> list[TokenDataset]:
    """The datasets inside concatenations (of concatenations), in order."""
    return [leaf for part in ds.parts for leaf in _leaves(part)] if hasattr(ds, "parts") else [ds]


_VERIFIED = {
    "shardfmt": "shardfmt: checksums, index structure and doc flags (preference pairs, KTO "
                "counts) verified",
    "megatron": "Megatron: header, file sizes and every index entry verified (Megatron files "
                "carry no checksums)",
}


def cmd_export_megatron(args: argparse.Namespace) -> int:
    from shardfmt.megatron import export_megatron
    ds = open_dataset(args.dir)
    result = export_megatron(ds, args.prefix, dtype=args.dtype, split=args.split,
                             overwrite=args.overwrite)
    print(f"wrote {args.prefix}.bin / {args.prefix}.idx ({result})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from shardfmt.merge import merge_datasets
    out = merge_datasets(args.dirs[:-1], args.dirs[-1], overwrite=args.overwrite)
    ds = open_dataset(out)
    print(f"merged {len(args.dirs) - 1} parts into {out}: {len(ds)} samples, "
          f"{ds.num_tokens} tokens, {ds.num_shards} shards")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shardfmt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="counts, dtype, length percentiles, decoded samples")
    ins.add_argument("dirs", nargs="+", help="dataset directories (OUT/CORPUS), Megatron prefixes "
                     "or directories of Megatron .bin/.idx pairs")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.add_argument("--tokenizer", help="tokenizer dir for --show (default: the dataset's own)")
    ins.add_argument("--show", type=int, default=0, help="decode the first N samples")
    ins.set_defaults(func=cmd_inspect)
    ver = sub.add_parser("verify", help="recompute checksums and scan every index; exit 0/1")
    ver.add_argument("dirs", nargs="+", help="as for inspect; Megatron pairs get header, size and "
                     "index checks (they have no checksums)")
    ver.set_defaults(func=cmd_verify)
    exp = sub.add_parser("export-megatron", help="write a Megatron-LM MMIDIDX .bin/.idx pair")
    exp.add_argument("dir", help="dataset directory, Megatron prefix or directory of pairs")
    exp.add_argument("prefix", help="output path prefix (PREFIX.bin, PREFIX.idx)")
    exp.add_argument("--dtype", default=None, help="token dtype of the output (default: the "
                     "dataset's); a narrower one is refused if an id does not fit")
    exp.add_argument("--split", choices=("document", "segment"), default="document",
                     help="one Megatron sequence per whole document, or per document segment")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX pair")
    exp.set_defaults(func=cmd_export_megatron)
    mer = sub.add_parser("merge", help="join --part outputs into one dataset (no token copies)")
    mer.add_argument("dirs", nargs="+", metavar="DIR", help="PART_DIR... OUT_DIR")
    mer.add_argument("--overwrite", action="store_true")
    mer.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 0 ok, 1 the run failed, 2 bad input or usage (see the module doc)."""
    parser = build_parser()
    args = parser.parse_args(argv)   # a bad flag: argparse prints the usage and exits 2
    if args.command == "merge" and len(args.dirs) < 2:
        parser.error("merge: give at least one part directory and the output directory")
    try:
        return args.func(args)
    except ShardfmtError as err:   # ours only: anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
