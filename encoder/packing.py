"""Turning encoded documents into training samples: pretrain chunking and best-fit-decreasing packing.

Both are plain functions over lengths/arrays, run in the main process on documents in input order,
so the result never depends on the number of workers.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Iterator

import numpy as np

from shardfmt.writer import SampleBlock

DEFAULT_PACK_WINDOW = 20000


def best_fit_decreasing(lengths: list[int], *, capacity: int) -> list[list[int]]:
    """Pack items (by index) into bins of `capacity`: longest first, each into the fullest bin it
    fits (ties: the earliest bin). Deterministic. Items are listed in input order within a bin and
    bins in order of creation.

    >>> best_fit_decreasing([5, 3, 2, 6, 4], capacity=10)
    [[3, 4], [0, 1, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []   # sorted (remaining capacity, bin id)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than the capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, b = free.pop(k)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    return [sorted(b) for b in bins]


def drain_sparsest(bins: list[list[int]], lengths: list[int], *, capacity: int) -> list[list[int]]:
    """Try to empty the least-filled bin into the others, then repeat with the next one.

    Best-fit-decreasing often ends one bin above the lower bound ceil(total/capacity); the
    other bins' scattered free space can usually absorb the sparsest bin. Moves: put an item of
    the sparse bin into the fullest bin it fits, or swap it with a shorter item of a bin where
    it fits in its place (the shorter item goes back to the sparse bin). Every move shrinks the
    sparse bin, so this ends. Deterministic.

    >>> drain_sparsest([[0, 1], [2, 3], [4]], [6, 3, 5, 4, 1], capacity=10)
    [[0, 1, 4], [2, 3]]
    """
    bins = [list(b) for b in bins]
    while len(bins) > 1:
        lengths_arr = np.asarray(lengths, dtype=np.int64)
        loads = [int(lengths_arr[b].sum()) for b in bins]
        s = int(np.argmin(loads))
        if not _drain_one(bins, s, lengths_arr, capacity):
            break
        del bins[s]
    return [sorted(b) for b in bins]


def _drain_one(bins: list[list[int]], s: int, lengths: np.ndarray, capacity: int) -> bool:
    """Move bin `s`'s items elsewhere (in place). True if it ended empty; else bins are unchanged
    in count (items may have been exchanged, never lost)."""
    item_bin = np.full(len(lengths), -1, dtype=np.int64)
    for b, items in enumerate(bins):
        item_bin[items] = b
    free = np.array([capacity - int(lengths[b].sum()) for b in bins], dtype=np.int64)
    free[s] = -1  # never a target
    while bins[s]:
        if _place_or_swap(bins, s, item_bin, free, lengths):
            continue
        x = min(bins[s], key=lambda i: (lengths[i], i))
        t = _gather_free(bins, s, item_bin, free, lengths, need=int(lengths[x]))
        if t is None:
            return False
        _move(bins, item_bin, free, x, s, t, lengths)
    return True


def _place_or_swap(bins, s, item_bin, free, lengths) -> bool:
    """One move that shrinks bin `s`: place an item elsewhere, or swap it for a shorter one."""
    for x in sorted(bins[s], key=lambda i: (-lengths[i], i)):
        lx = lengths[x]
        fits = np.flatnonzero(free >= lx)
        if fits.size:
            _move(bins, item_bin, free, x, s, int(fits[np.argmin(free[fits])]), lengths)
            return True
        room = free[item_bin] + lengths - lx          # free left in y's bin after the swap
        ok = np.flatnonzero((item_bin != s) & (item_bin >= 0) & (lengths < lx) & (room >= 0))
        if ok.size:
            y = int(ok[np.argmin(room[ok])])
            b = int(item_bin[y])
            _move(bins, item_bin, free, y, b, s, lengths)
            _move(bins, item_bin, free, x, s, b, lengths)
            return True
    return False


def _gather_free(bins, s, item_bin, free, lengths, *, need: int) -> int | None:
    """Collect free space into the emptiest other bin T by swapping a long item of T with a
    shorter one of a bin that has room for the difference. Returns T once it has `need` free."""
    for t in np.argsort(-free, kind="stable")[:16].tolist():
        if t != s and _gather_into(bins, s, t, item_bin, free, lengths, need=need):
            return t
    return None


def _gather_into(bins, s, t, item_bin, free, lengths, *, need: int) -> bool:
    while free[t] < need:
        best = None
        for a in bins[t]:
            d = lengths[a] - lengths                   # free T gains if a and y swap
            ok = np.flatnonzero((item_bin != s) & (item_bin != t) & (item_bin >= 0) & (d > 0)
                                & (d <= free[np.maximum(item_bin, 0)]))
            if ok.size:
                y = int(ok[np.argmax(d[ok])])
                if best is None or d[y] > best[0]:
                    best = (int(d[y]), a, y)
        if best is None:
            return False
        _, a, y = best
        b = int(item_bin[y])
        _move(bins, item_bin, free, a, t, b, lengths)
        _move(bins, item_bin, free, y, b, t, lengths)
    return True


def _move(bins, item_bin, free, item: int, src: int, dst: int, lengths) -> None:
    bins[src].remove(item)
    bins[dst].append(item)
    item_bin[item] = dst
    if free[src] >= 0:
        free[src] += lengths[item]
    if free[dst] >= 0:
        free[dst] -= lengths[item]


def pack_windows(docs: Iterable[tuple[np.ndarray, np.ndarray]], *, capacity: int,
                 window: int) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Best-fit-decreasing (+ `drain_sparsest`) over consecutive windows of `window` documents;
    yields packed samples in order of bin creation.

    Memory is bounded by one window; each window's last bins may be partly empty.
    """
    buf: list[tuple[np.ndarray, np.ndarray]] = []
    for doc in docs:
        buf.append(doc)
        if len(buf) >= window:
            yield from _pack_buffer(buf, capacity)
            buf = []
    if buf:
        yield from _pack_buffer(buf, capacity)


def _pack_buffer(buf: list, capacity: int) -> Iterator[list]:
    lengths = [len(ids) for ids, _ in buf]
    bins = drain_sparsest(best_fit_decreasing(lengths, capacity=capacity), lengths,
                          capacity=capacity)
    for b in bins:
        yield [buf[i] for i in b]


class PretrainChunker:
    """Concatenate documents and cut the stream into `max_length` samples of document segments.

    `push(ids)` returns the samples completed so far as `(segments, continues_previous)`;
    `finish()` returns the final partial sample (the remainder), if any. No token is lost, and a
    stream that is an exact multiple of max_length ends with no empty or oversized sample.

    >>> c = PretrainChunker(max_length=4)
    >>> [[s.tolist() for s in segs] for segs, _ in c.push(np.arange(6))]
    [[[0, 1, 2, 3]]]
    >>> [[s.tolist() for s in segs] for segs, _ in c.push(np.arange(2))]
    [[[4, 5], [0, 1]]]
    >>> c.finish()
    """

    def __init__(self, *, max_length: int):
        self.max_length = max_length
        self._segments: list[np.ndarray] = []
        self._fill = 0
        self._continues = False  # does the sample being built start mid-document?

    def push(self, ids: np.ndarray) -> list[tuple[list[np.ndarray], bool]]:
        done = []
        pos = 0
        while pos < len(ids):
            take = min(self.max_length - self._fill, len(ids) - pos)
            self._segments.append(ids[pos:pos + take])
            self._fill += take
            pos += take
            if self._fill == self.max_length:
                done.append((self._segments, self._continues))
                self._continues = pos < len(ids)
                self._segments, self._fill = [], 0
        return done

    def push_batch(self, ids: np.ndarray, offsets: np.ndarray
                   ) -> list[tuple[list[np.ndarray], bool]]:
        """`push` for a whole batch of documents at once (document k = ids[offsets[k]:
        offsets[k+1]]): one concatenation, then per *sample* (not per document) a searchsorted
        for the document ends inside it. Same samples and flags as pushing one by one.

        >>> c = PretrainChunker(max_length=4)
        >>> [([s.tolist() for s in segs], cont)
        ...  for segs, cont in c.push_batch(np.arange(8), np.array([0, 6, 8]))]
        [([[0, 1, 2, 3]], False), ([[4, 5], [6, 7]], True)]
        """
        length = self.max_length
        carry_ends = np.cumsum([len(x) for x in self._segments], dtype=np.int64)
        carry = self._fill
        stream = np.concatenate(self._segments + [ids[offsets[0]:offsets[-1]]]) \
            if self._segments else ids[offsets[0]:offsets[-1]]
        ends = np.concatenate([carry_ends, carry + offsets[1:] - offsets[0]])  # document ends
        full = len(stream) // length
        done = []
        continues = self._continues
        for k in range(full):
            a, b = k * length, (k + 1) * length
            lo, hi = np.searchsorted(ends, a, "right"), np.searchsorted(ends, b, "left")
            done.append((np.split(stream[a:b], ends[lo:hi] - a), continues))
            continues = not (hi < len(ends) and ends[hi] == b)   # next sample starts mid-document
        a = full * length
        rest = stream[a:]
        if len(rest):
            lo = np.searchsorted(ends, a, "right")
            self._segments = np.split(rest, ends[lo:-1] - a) if lo < len(ends) - 1 else [rest]
        else:
            self._segments = []
        self._fill = len(rest)
        self._continues = continues
        return done

    def push_block(self, ids: np.ndarray, offsets: np.ndarray) -> SampleBlock | None:
        """`push_batch` with the completed samples as one `SampleBlock` (flat arrays; None when
        no sample was completed) for `ShardWriter.add_block`: no Python per sample either.
        Same samples, segments and flags as `push_batch`.

        >>> c = PretrainChunker(max_length=4)
        >>> b = c.push_block(np.arange(8), np.array([0, 6, 8]))
        >>> b.doc_lens.tolist(), b.docs_per_sample.tolist(), b.continues.tolist()
        ([4, 2, 2], [1, 2], [False, True])
        """
        length = self.max_length
        carry_ends = np.cumsum([len(x) for x in self._segments], dtype=np.int64)
        body = ids[offsets[0]:offsets[-1]]
        stream = np.concatenate(self._segments + [body]) if self._segments else body
        # document ends in the stream: strictly increasing (every document has >= 1 token)
        ends = np.concatenate([carry_ends, self._fill + offsets[1:] - offsets[0]])
        full = len(stream) // length
        cut = full * length
        block = None
        if full:
            bounds = np.arange(1, full + 1, dtype=np.int64) * length   # sample ends
            cuts = np.union1d(ends[ends < cut], bounds)                # segment ends
            seg_lens = np.diff(cuts, prepend=0)
            per_sample = np.diff(np.searchsorted(cuts, bounds, side="right"), prepend=0)
            on_end = np.isin(bounds, ends, assume_unique=True)   # sample ends with a document
            continues = np.concatenate(([self._continues], ~on_end[:-1]))
            block = SampleBlock(stream[:cut], seg_lens, per_sample, continues)
            self._continues = not bool(on_end[-1])
        rest = stream[cut:]
        if len(rest):
            lo = np.searchsorted(ends, cut, "right")
            self._segments = np.split(rest, ends[lo:-1] - cut) if lo < len(ends) - 1 else [rest]
        else:
            self._segments = []
        self._fill = len(rest)
        return block

    def finish(self) -> tuple[list[np.ndarray], bool] | None:
        """The remainder (< max_length tokens) or None when the stream ended on a boundary."""
        if not self._segments:
            return None
        out = (self._segments, self._continues)
        self._segments, self._fill, self._continues = [], 0, False
        return out
