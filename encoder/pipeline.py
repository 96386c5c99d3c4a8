"""Rows -> validated batches -> encoded documents, in input order, with 1 or K worker processes.

Workers only tokenize; reading the plugin, validation, chunking and packing stay in the main
process, and results are consumed strictly in submission order (with --num_workers 1 a single
background thread tokenizes one batch ahead). So the output is byte-identical
for any --num_workers. At most 2*K batches are in flight, so memory stays bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from typing import Any, Iterable, Iterator

from encoder.plugins import RowError, check_row
from encoder.sample_encoder import Encoded, EncoderSpec, SampleEncoder
from encoder.stats import RunStats

BATCH_ROWS = 512
BATCH_CHARS = 4_000_000

Batch = tuple[list[int], list[Any]]   # (row indices, normalised rows)


def validated_batches(rows: Iterable[tuple[int, Any]], *, encode_type: str, plugin_path: str,
                      skip_invalid: bool, stats: RunStats) -> Iterator[Batch]:
    """Check each row; a bad row raises RowError, or is skipped and recorded with --skip_invalid."""
    idx, batch, chars = [], [], 0
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
        if len(batch) >= BATCH_ROWS or chars >= BATCH_CHARS:
            yield idx, batch
            idx, batch, chars = [], [], 0
    if batch:
        yield idx, batch


def reject(err: RowError, *, skip_invalid: bool, stats: RunStats) -> None:
    """Raise `err`, or with --skip_invalid count it and keep its reason for the report."""
    if not skip_invalid:
        raise RowError(err.plugin, err.row, err.problem + " (fix the data or the plugin, or pass "
                       "--skip_invalid to skip such rows)")
    stats.skip(f"row {err.row}: {err.problem}")


def encode_batches(batches: Iterable[Batch], *, spec: EncoderSpec, num_workers: int,
                   encoder: SampleEncoder | None = None) -> Iterator[tuple[int, Encoded]]:
    """`(row_index, Encoded)` for every row, in input order."""
    if num_workers <= 1:
        yield from _encode_in_thread(batches, encoder or SampleEncoder(spec))
        return
    yield from _encode_in_pool(batches, spec=spec, num_workers=num_workers)


def _encode_in_thread(batches: Iterable[Batch], enc: SampleEncoder) -> Iterator[tuple[int, Encoded]]:
    """One background thread tokenizes the next batch (the Rust tokenizer releases the GIL) while
    the caller chunks/packs/writes the previous one. Batches are encoded one at a time, in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending: deque = deque()
        for idx, rows in batches:
            pending.append((idx, pool.submit(enc.encode_rows, rows)))
            if len(pending) >= 2:
                idx0, fut = pending.popleft()
                yield from zip(idx0, fut.result())
        while pending:
            idx0, fut = pending.popleft()
            yield from zip(idx0, fut.result())


def _encode_in_pool(batches: Iterable[Batch], *, spec: EncoderSpec,
                    num_workers: int) -> Iterator[tuple[int, Encoded]]:
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before fork: K processes share the cores
    ctx = mp.get_context(method)
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for idx, rows in batches:
            pending.append((idx, pool.apply_async(_encode_in_worker, (rows,))))
            if len(pending) >= 2 * num_workers:
                idx0, res = pending.popleft()
                yield from zip(idx0, res.get())
        while pending:
            idx0, res = pending.popleft()
            yield from zip(idx0, res.get())


_WORKER_ENCODER: SampleEncoder | None = None


def _init_worker(spec: EncoderSpec) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = SampleEncoder(spec)


def _encode_in_worker(rows: list[Any]) -> list[Encoded]:
    return _WORKER_ENCODER.encode_rows(rows)
