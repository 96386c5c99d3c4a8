"""`llm-encode` / `python encoder/main.py` / `python -m encoder.main`: plugin rows -> token shards.

>>> main(["--tokenizer_path", "../shared/tokenizers/gpt2", "--encode_type", "qa",
...       "--data_loader_path", "encoder/user_data_loader/alpaca.py", "--output_path", "out",
...       "--corpus_name", "demo", "--max_length", "512"])            # doctest: +SKIP
0
"""

from __future__ import annotations

import time

PROCESS_START = time.time()   # before the heavy imports: the set-up line counts them

import itertools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any, Callable, Iterable, Iterator  # noqa: E402

import numpy as np  # noqa: E402

from encoder.chat_render import resolve_chat_template  # noqa: E402
from encoder.cli import EncodeArgs, build_parser, check_args, parse_part  # noqa: E402
from encoder.packing import PretrainChunker, pack_windows  # noqa: E402
from encoder.pipeline import (encode_batches, read_ahead, reject,  # noqa: E402
                              validated_batches)
from encoder.errors import (EncoderError, OutputExistsError, OutputNotWritableError,  # noqa: E402
                            OutputWriteError, RowError, exit_code)
from encoder.plugins import iter_part, load_plugin, parse_kv_args  # noqa: E402
from encoder.json_tokenizer import JsonTokenizer  # noqa: E402
from encoder.document_encoder import (DocumentEncoder, Encoded,  # noqa: E402
                                      EncodedBatch, EncoderSpec, load_spec_tokenizer)
from encoder.stats import (RunStats, plot_lengths, summary_lines,  # noqa: E402
                           truncation_warning, write_stats_json)
from encoder.tokenizer_policy import choose_dtype  # noqa: E402
from shardfmt.writer import SampleBlock, fsync_tree  # noqa: E402
from shardfmt.spec import DOC_FLAG_UNDESIRABLE  # noqa: E402

IMPORTS_DONE = time.time()

# One packed training window before it is written: its documents as (ids, loss mask) pairs, and
# whether it continues the previous window's last document (a split pretrain chunk).
PackedWindow = tuple[list[tuple[np.ndarray, np.ndarray]], bool]


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, encode, print a summary. Returns 0; 2 (bad flags, files, plugin or rows) or
    1 (the run failed: cross-check, disk full) after a one-line error. Only the encoder's own
    errors are caught: any other exception is a bug and keeps its traceback."""
    from shardfmt.run_config import format_resolved, parse_with_config
    ns = parse_with_config(build_parser(), argv)  # --config run.yaml, command line wins
    source = f"--config {ns.config} + command line" if ns.config else "command line"
    print(format_resolved(vars(ns), title=f"llm-encode: resolved flags ({source}):"), flush=True)
    args = EncodeArgs.from_namespace(ns)
    set_thread_env(args)
    try:
        check_args(args)
        run(args)
    except EncoderError as e:
        print(f"llm-encode: error: {e}", file=sys.stderr)
        return exit_code(e)
    return 0


def set_thread_env(args: Any) -> None:
    """Thread counts for the Rust tokenizers, set here (the command) and never by the library,
    and only where the user has not set them: gigatoken's pool gets --num_workers threads;
    worker processes each run HF tokenizers single-threaded (K processes share the cores)."""
    if args.num_workers is not None and args.num_workers >= 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.num_workers))
        if args.num_workers > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def output_error(e: OSError, args: Any) -> EncoderError:
    """Ours for a failed write: what, errno name, path; and that nothing looks complete. An
    output path the user cannot write to is bad input (exit 2); disk full or an I/O error is a
    failed run (exit 1)."""
    import errno
    code = f" [{errno.errorcode.get(e.errno, e.errno)}]" if e.errno else ""
    where = e.filename or (os.path.join(args.output_path, args.corpus_name)
                           if args.output_path and args.corpus_name else "")
    text = (f"{e.strerror or e}{code}: {where} (the dataset was not completed: no manifest.json; "
            f"free space or fix permissions, then re-run with --overwrite)")
    unwritable = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)
    return OutputNotWritableError(text) if unwritable else OutputWriteError(text)


def run(args: Any, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode according to `args` (EncodeArgs, or a parsed Namespace: converted, not changed);
    returns the stats dict. `progress(rows, tokens)`, if given, is called after every batch with
    the counts so far (encoder.distributed reports them)."""
    if not isinstance(args, EncodeArgs):
        args = EncodeArgs.from_namespace(args)
    started = time.time()
    part = parse_part(args.part)
    plugin = load_plugin(args.data_loader_path)
    chat_template, chat_template_source = resolve_chat_template(args.chat_template)
    spec = EncoderSpec(tokenizer_path=args.tokenizer_path, encode_type=args.encode_type,
                       max_length=args.max_length, template=args.template,
                       truncation=args.truncation, add_tokens=tuple(args.add_tokens),
                       tokenizer_backend=args.tokenizer_backend, chat_template=chat_template,
                       chat_template_source=chat_template_source,
                       cross_check_every=args.cross_check_every,
                       parallel=args.num_workers is None or args.num_workers > 1)
    loading = time.time()
    tok = load_spec_tokenizer(spec)
    startup = {"imports": IMPORTS_DONE - PROCESS_START,
               "tokenizer load": time.time() - loading}
    # the tokenizer's identity for the manifest (get_vocab + hash: ~0.3-0.8 s for qwen3) is
    # computed in the background while the engine is chosen. (Started after set-up instead, it
    # took ~0.3-0.5 s from the steady phase of a 1M-token qwen3 run and gave no wall time back:
    # it holds the GIL either way.)
    # With a tokenizer.json-only tokenizer the vocab hash comes from the cache after the first run
    # (encoder/verdict_cache.py): no get_vocab + hash, ~0.2 s of GIL time for qwen3.
    from concurrent.futures import ThreadPoolExecutor
    from encoder.verdict_cache import cached_tokenizer_identity
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity") as side:
        identity = side.submit(cached_tokenizer_identity, tok)
        return _run_loaded(args, started=started, part=part, plugin=plugin, spec=spec, tok=tok,
                           identity=identity, progress=progress, startup=startup)


def _run_loaded(args: Any, *, started: float, part: tuple[int, int] | None, plugin: Any,
                spec: EncoderSpec, tok: Any, identity: Any,
                progress: Callable[[int, int], None] | None,
                startup: dict | None = None) -> dict:
    added = {t: int(tok.convert_tokens_to_ids(t)) for t in args.add_tokens}
    dtype = choose_dtype(args.save_dtype, vocab_size=len(tok), num_added=len(added))
    encoder = DocumentEncoder(spec, tokenizer=tok)
    stats = RunStats(max_length=args.max_length)
    if args.encode_type == "preference":  # a pair sample holds two sequences
        stats.sample_capacity = 2 * args.max_length
    clock = {"steady": time.time()}

    def ready() -> None:   # the engine is chosen (first batch read): set-up ends here
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in startup.items()) \
            or "imports, tokenizer load, engine choice"
        print(f"setup {time.time() - started:.1f}s ({time.time() - PROCESS_START:.2f}s since "
              f"start: {parts}): {tokenizer_loader_name(tok)} len {len(tok)}, dtype {dtype}, "
              f"template {args.template if args.encode_type != 'pretrain' else '-'}",
              file=sys.stderr)
        clock["steady"] = time.time()

    startup = startup if startup is not None else {}
    # a generator: nothing is read before the writer has created the (incomplete) dataset dir
    samples = sample_stream(args, plugin=plugin, part=part, spec=spec, encoder=encoder,
                            stats=stats, on_ready=ready, progress=progress, startup=startup)
    if args.analyze:
        if args.plot:
            print("note: --plot is ignored with --analyze (nothing is written)", file=sys.stderr)
        for item in samples:
            if isinstance(item, SampleBlock):
                stats.sample_lengths.frombytes(item.sample_lens().astype(np.int32).tobytes())
            else:
                stats.sample_lengths.append(sum(len(ids) for ids, _ in item[0]))
        result = stats.as_dict()
        result["tokenizer_backend"] = encoder.backend_info()
    else:
        result = write_dataset(samples, args=args, stats=stats, dtype=dtype, encoder=encoder,
                               added=added, part=part, tokenizer_info=identity)
    started = clock["steady"]
    for line in summary_lines(result, seconds=time.time() - started):
        print(line)
    if args.analyze and args.encode_type != "pretrain":
        print(f"suggested: --max_length {result['max_length_keeping_99pct']} (the 99th-percentile "
              f"document length: longer ones are handled by --truncation {args.truncation})")
    if args.encode_type != "pretrain":
        warning = truncation_warning(result, truncation=args.truncation, analyze=args.analyze)
        if warning:
            print(warning, file=sys.stderr)
    return result


def tokenizer_loader_name(tok: Any) -> str:
    """How the tokenizer was loaded, for the set-up line and the manifest."""
    if isinstance(tok, JsonTokenizer):
        return f"tokenizers.Tokenizer (tokenizer.json; {tok.class_name})"
    return f"transformers {type(tok).__name__}"


def sample_stream(args: Any, *, plugin: Any, part: tuple[int, int] | None, spec: EncoderSpec,
                  encoder: DocumentEncoder, stats: RunStats,
                  on_ready: Any = None,
                  progress: Callable[[int, int], None] | None = None,
                  startup: dict | None = None) -> Iterator[PackedWindow | SampleBlock]:
    """plugin rows -> validated batches (reader thread) -> encoded batches (tokenizer thread/pool,
    in order) -> training samples. The engine is chosen on the first batch (`select_backend`),
    then `on_ready()` is called; `progress(rows, tokens)` after every batch. `startup` (if
    given) gets the seconds spent reading the first batch, building the engine and calibrating.
    Yields `Sample`s, or `SampleBlock`s (pretrain)."""
    rows = iter_part(plugin, parse_kv_args(args.data_loader_args), part=part)
    batches = read_ahead(validated_batches(rows, encode_type=args.encode_type,
                                           plugin_path=plugin.path,
                                           skip_invalid=args.skip_invalid, stats=stats))
    waited = time.time()
    first = next(batches, None)
    choosing = time.time()
    engine = encoder.select_backend(first[1] if first else [])
    if startup is not None:   # the start-up line's parts
        build = getattr(encoder.engine, "build_seconds", 0.0)
        startup.update({"first batch read": choosing - waited,
                               f"{engine} build": build,
                               "calibration": time.time() - choosing - build})
    print(f"tokenizer backend: {engine} ({encoder.backend_reason}); cross-check: "
          f"{encoder.backend_info()['cross_check']}", file=sys.stderr)
    if on_ready is not None:
        on_ready()
    if first is not None:
        batches = itertools.chain([first], batches)
    encoded = with_progress(encode_batches(batches, spec=spec, num_workers=args.num_workers or 1,
                                           encoder=encoder), progress)
    if args.encode_type == "pretrain":
        yield from pretrain_samples(encoded, max_length=args.max_length, stats=stats,
                                    drop_remainder=args.drop_remainder)
        return
    docs = accepted_docs(encoded, stats=stats, plugin_path=plugin.path,
                         skip_invalid=args.skip_invalid)
    yield from to_samples(docs, args=args, stats=stats)


# -- stream stages --------------------------------------------------------------------------------
Encoded_ = tuple[list[int], EncodedBatch]


def with_progress(items: Iterable[Encoded_],
                  progress: Callable[[int, int], None] | None = None) -> Iterator[Encoded_]:
    """tqdm bar over rows with tokens/s (shown on a terminal only), updated once per batch;
    `progress(rows, tokens)` likewise."""
    from tqdm import tqdm

    bar = tqdm(unit=" rows", dynamic_ncols=True, disable=None, file=sys.stderr)
    start, tokens, rows = time.time(), 0, 0
    try:
        for idx, batch in items:
            tokens += int(batch.raw_lens.sum())
            rows += len(idx)
            bar.update(len(idx))
            bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):,.0f} tok/s",
                                refresh=False)
            if progress is not None:
                progress(rows, tokens)
            yield idx, batch
    finally:
        bar.close()


def accepted_docs(encoded: Iterable[Encoded_], *, stats: RunStats, plugin_path: str,
                  skip_invalid: bool) -> Iterator[Encoded]:
    """Encoded documents that survive; counts truncated/dropped, rejects template failures."""
    for idx, batch in encoded:
        for i, enc in zip(idx, batch.rows()):
            if enc.status == "invalid":
                reject(RowError(plugin_path, i, enc.reason), skip_invalid=skip_invalid,
                       stats=stats)
                continue
            stats.doc_lengths.append(enc.raw_len)
            if enc.status == "dropped":
                stats.dropped += 1
                continue
            stats.truncated += enc.status == "truncated"
            yield enc


def to_samples(docs: Iterable[Encoded], *, args: Any, stats: RunStats) -> Iterator[PackedWindow]:
    """qa/chat documents (or preference pairs) -> training samples: packed bins, or one each."""
    if args.encode_type == "preference":  # whole pairs only (encoder/preference.py)
        from encoder.preference import pair_samples
        yield from pair_samples(docs, max_length=args.max_length, merge_data=args.merge_data,
                                pack_window=args.pack_window)
    elif args.encode_type == "kto":  # one example per segment, its label beside it
        from encoder.preference import unpaired_samples
        yield from unpaired_samples(docs, max_length=args.max_length, merge_data=args.merge_data,
                                    pack_window=args.pack_window)
    elif args.merge_data:
        pairs = ((d.ids, d.mask) for d in docs)
        for packed in pack_windows(pairs, capacity=args.max_length, window=args.pack_window):
            yield packed, False
    else:
        for d in docs:
            yield [(d.ids, d.mask)], False


def pretrain_samples(encoded: Iterable[Encoded_], *, max_length: int, stats: RunStats,
                     drop_remainder: bool) -> Iterator[PackedWindow | SampleBlock]:
    """Concatenate documents and cut into max_length samples; every token is trained. Works a
    batch at a time on flat arrays (`PretrainChunker.push_block`): no Python per document or
    per sample. Yields a `SampleBlock` per batch, and the remainder as one `PackedWindow`."""
    chunker = PretrainChunker(max_length=max_length)
    for _, batch in encoded:
        stats.doc_lengths.frombytes(batch.raw_lens.astype(np.int32).tobytes())
        block = chunker.push_block(batch.ids, batch.offsets)
        if block is not None:
            yield block
    rest = chunker.finish()
    if rest is not None:
        stats.remainder_tokens = sum(len(s) for s in rest[0])
        stats.remainder_dropped = drop_remainder
        if not drop_remainder:
            segs, cont = rest
            yield [(s, None) for s in segs], cont  # None = every token trained


# -- writing --------------------------------------------------------------------------------------
def write_dataset(samples: Iterable[PackedWindow | SampleBlock], *, args: Any, stats: RunStats,
                  dtype: str, encoder: DocumentEncoder, added: dict, part: tuple[int, int] | None,
                  tokenizer_info: Any = None) -> dict:
    """Stream samples into a ShardWriter; tokenizer/, stats.json and lengths.png beside it.
    `tokenizer_info`: the manifest's tokenizer identity, or a future of it (computed while the
    first batch is read; needed only when the manifest is written). A failed write raises
    OutputWriteError / OutputNotWritableError (encoder.errors), naming the path."""
    try:
        return _write_dataset(samples, args=args, stats=stats, dtype=dtype, encoder=encoder,
                              added=added, part=part, tokenizer_info=tokenizer_info)
    except OSError as e:   # disk full, file too large, read-only or unwritable output directory
        if isinstance(e, EncoderError):
            raise
        raise output_error(e, args) from e


def _write_dataset(samples: Iterable[PackedWindow | SampleBlock], *, args: Any, stats: RunStats,
                   dtype: str, encoder: DocumentEncoder, added: dict, part: tuple[int, int] | None,
                   tokenizer_info: Any) -> dict:
    from shardfmt import ShardWriter, tokenizer_identity

    packing = "chunk" if args.encode_type == "pretrain" else "bfd" if args.merge_data else "none"
    tokens_per_file = int(args.tokens_per_file)
    pairs = args.encode_type == "preference"
    try:
        # a pair sample holds two sequences of up to max_length each
        writer = ShardWriter(args.output_path, args.corpus_name, dtype=dtype,
                             encode_type=args.encode_type,
                             max_length=args.max_length * (2 if pairs else 1),
                             tokens_per_file=tokens_per_file,
                             tokenizer_info={}, packing=packing,
                             metadata=run_metadata(args, encoder=encoder, added=added, part=part),
                             overwrite=args.overwrite)
    except FileExistsError as e:
        raise OutputExistsError(f"refusing to write: {e}") from None
    kto_counts = [0, 0]   # desirable, undesirable examples written
    with writer as w:
        for item in samples:
            if isinstance(item, SampleBlock):   # pretrain: many samples at once
                w.add_block(item)
                stats.sample_lengths.frombytes(item.sample_lens().astype(np.int32).tobytes())
                continue
            segs, cont, *labels = item   # kto: the desirable label of each segment
            if labels:
                w.add_sample(segs, continues_previous=cont,
                             doc_flags=[0 if ok else DOC_FLAG_UNDESIRABLE for ok in labels[0]])
                kto_counts[0] += sum(labels[0])
                kto_counts[1] += len(labels[0]) - sum(labels[0])
            else:
                w.add_sample(segs, continues_previous=cont)
            stats.sample_lengths.append(sum(len(ids) for ids, _ in segs))
        stats.tokens_per_shard = w.shard_tokens   # the writer's own roll rule, not re-derived
        if pairs:
            from shardfmt.preference import preference_manifest_entry
            w.manifest_extra["preference"] = preference_manifest_entry(
                sequence_max_length=args.max_length, pairs=w.counts["docs"] // 2)
        if args.encode_type == "kto":
            from shardfmt.preference import kto_manifest_entry
            w.manifest_extra["kto"] = kto_manifest_entry(
                sequence_max_length=args.max_length, desirable=kto_counts[0],
                undesirable=kto_counts[1])
        w.metadata["stats"] = result = stats.as_dict()
        result["tokenizer_backend"] = w.metadata["encoder"]["tokenizer_backend"] = \
            encoder.backend_info()   # chosen on the first batch, after the writer was created
        w.tokenizer_info = (tokenizer_info.result() if hasattr(tokenizer_info, "result")
                            else tokenizer_info or tokenizer_identity(encoder.tok))
        if added:
            encoder.tok.save_pretrained(str(w.directory / "tokenizer"))
            fsync_tree(w.directory / "tokenizer")  # ~5 files: on disk before the manifest
        # before the writer closes: manifest.json is written last, so a dataset with a manifest
        # always has its stats.json (and plot, and tokenizer/) too, each fsynced before it
        write_stats_json(w.directory / "stats.json", result)
        if args.plot:
            plot_lengths(w.directory / "lengths.png", stats.doc_lengths,
                         max_length=args.max_length,
                         title=f"{args.corpus_name}: {len(stats.doc_lengths)} documents")
    out = w.directory
    print(f"wrote {out} ({dtype}, {w.counts['shards']} shard(s))")
    return result


def run_metadata(args: Any, *, encoder: DocumentEncoder, added: dict,
                 part: tuple[int, int] | None) -> dict:
    """Everything needed to reproduce the prompt and the encoding (no worker count, no times)."""
    return {
        "encoder": {
            "encode_type": args.encode_type,
            "template": args.template if args.encode_type != "pretrain" else None,
            "chat_template": encoder.spec.chat_template_source,
            "truncation": args.truncation,
            "max_length": args.max_length,
            "merge_data": bool(args.merge_data) and args.encode_type != "pretrain",
            "pack_window": args.pack_window,
            "drop_remainder": args.drop_remainder,
            "data_loader": os.path.basename(args.data_loader_path),
            "data_loader_args": parse_kv_args(args.data_loader_args),
            "part": f"{part[0]}/{part[1]}" if part else None,
            "tokenizer_loader": tokenizer_loader_name(encoder.tok),
            "tokenizer_backend": encoder.backend_info(),
        },
        "special_tokens": encoder.describe(),
        "added_tokens": added,
        "tokenizer_dir": "tokenizer" if added else None,
    }


if __name__ == "__main__":
    sys.exit(main())
