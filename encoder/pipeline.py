"""Rows -> validated batches -> encoded batches, in input order, in three overlapping stages.

  reader thread   the plugin's generator + row validation (`read_ahead`, 4 batches ahead)
  tokenizer       one background thread per batch in flight; gigatoken fans each call out over
                  its own thread pool (--num_workers threads), the other engines use
                  --num_workers processes
  main thread     chunking/packing, writing and checksumming (shardfmt writer)
Results are consumed strictly in submission order, so the output is byte-identical for any
--num_workers. At most 2*K batches are in flight, so memory stays bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections import deque
from dataclasses import replace
from typing import Any, Iterable, Iterator

from encoder.errors import RowError
from encoder.plugins import check_row
from encoder.document_encoder import DocumentEncoder, EncodedBatch, EncoderSpec
from encoder.stats import RunStats

BATCH_ROWS = 512
# pretrain batches are 8x larger (still capped by BATCH_CHARS): its hot path is one engine call,
# and gigatoken's pool runs ~1.3x faster on 4096-row batches than on 512-row ones (llama2, c4);
# qa/chat keep 512 rows (per-row template rendering; packing works per window anyway)
PRETRAIN_BATCH_FACTOR = 8
BATCH_CHARS = 4_000_000
# The first batch is smaller: it calibrates the engine (encoded twice, once by the slower
# reference; qwen3 on c4: ~2 s for 512 rows) and gets the pipeline going sooner.
FIRST_BATCH_ROWS = 128

Batch = tuple[list[int], list[Any]]   # (row indices, normalised rows)


def validated_batches(rows: Iterable[tuple[int, Any]], *, encode_type: str, plugin_path: str,
                      skip_invalid: bool, stats: RunStats) -> Iterator[Batch]:
    """Check each row; a bad row raises RowError, or is skipped and recorded with --skip_invalid."""
    idx, batch, chars = [], [], 0
    batch_rows = BATCH_ROWS * (PRETRAIN_BATCH_FACTOR if encode_type == "pretrain" else 1)
    limit = min(FIRST_BATCH_ROWS, batch_rows)
    for i, row in rows:
        stats.rows += 1
        try:
            norm = check_row(row, encode_type=encode_type)
        except ValueError as e:
            reject(RowError(plugin_path, i, str(e)), skip_invalid=skip_invalid, stats=stats)
            continue
        idx.append(i)
        batch.append(norm)
        chars += len(norm) if isinstance(norm, str) else sum(len(m["content"] or "") for m in norm)
        if len(batch) >= limit or chars >= BATCH_CHARS:
            yield idx, batch
            idx, batch, chars = [], [], 0
            limit = batch_rows
    if batch:
        yield idx, batch


def reject(err: RowError, *, skip_invalid: bool, stats: RunStats) -> None:
    """Raise `err`, or with --skip_invalid count it and keep its reason for the report."""
    if not skip_invalid:
        raise RowError(err.plugin, err.row, err.problem + " (fix the data or the plugin, or pass "
                       "--skip_invalid to skip such rows)")
    stats.skip(f"row {err.row}: {err.problem}")


def read_ahead(items: Iterable[Any], *, depth: int = 4) -> Iterator[Any]:
    """Iterate `items` in a background thread (the plugin's reading/parsing and row validation
    overlap tokenizing and writing); at most `depth` items wait, so memory stays bounded. An
    exception in the thread is re-raised here, in order."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, done))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
            q.put((False, e))

    thread = threading.Thread(target=produce, name="encoder-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def encode_batches(batches: Iterable[Batch], *, spec: EncoderSpec, num_workers: int,
                   encoder: DocumentEncoder) -> Iterator[tuple[list[int], EncodedBatch]]:
    """`(row_indices, EncodedBatch)` per batch, in input order. `encoder` has its engine chosen
    (`select_backend`); worker processes reuse that choice. gigatoken parallelizes inside one
    call on its own thread pool, so it always runs in-process (no pickling of results)."""
    if num_workers <= 1 or encoder.engine.name == "gigatoken":
        yield from _encode_in_thread(batches, encoder)
        return
    worker_spec = replace(spec, tokenizer_backend=encoder.engine.name, parallel=False)
    yield from _encode_in_pool(batches, spec=worker_spec, num_workers=num_workers)


def _encode_in_thread(batches: Iterable[Batch], enc: DocumentEncoder
                      ) -> Iterator[tuple[list[int], EncodedBatch]]:
    """One background thread tokenizes the next batch (the Rust tokenizers release the GIL) while
    the caller chunks/packs/writes the previous one. Batches are encoded one at a time, in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending: deque = deque()
        for idx, rows in batches:
            pending.append((idx, pool.submit(enc.encode_batch, rows, idx)))
            if len(pending) >= 2:
                idx0, fut = pending.popleft()
                yield idx0, fut.result()
        while pending:
            idx0, fut = pending.popleft()
            yield idx0, fut.result()


def _encode_in_pool(batches: Iterable[Batch], *, spec: EncoderSpec,
                    num_workers: int) -> Iterator[tuple[list[int], EncodedBatch]]:
    """K worker processes (tokenizers/transformers engines). The caller (main()) sets
    TOKENIZERS_PARALLELISM=false beforehand: this library function leaves the environment alone."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for idx, rows in batches:
            pending.append((idx, pool.apply_async(_encode_in_worker, (rows, idx))))
            if len(pending) >= 2 * num_workers:
                idx0, res = pending.popleft()
                yield idx0, res.get()
        while pending:
            idx0, res = pending.popleft()
            yield idx0, res.get()


_WORKER_ENCODER: DocumentEncoder | None = None


def _init_worker(spec: EncoderSpec) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = DocumentEncoder(spec)
    _WORKER_ENCODER.use_backend(spec.tokenizer_backend)


def _encode_in_worker(rows: list[Any], idx: list[int]) -> EncodedBatch:
    return _WORKER_ENCODER.encode_batch(rows, idx)
