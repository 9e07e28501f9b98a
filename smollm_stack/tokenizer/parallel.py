"""Work on a big file in parallel: cut it into chunks at safe positions (see pretokenize.py), read each chunk in a
worker process, and the pool of forked workers itself. The trainer counts pre-tokens this way (trainer.py) and the
file encoder encodes them (file_encoder.py); either gives the same result for any number of workers. Text that
arrives as a stream of documents (jsonl, parquet) goes to the same workers as batches, a bounded number in flight.
"""

import collections
import contextlib
import ctypes
import multiprocessing
import os
import sys

from smollm_stack.tokenizer.inputs import check_utf8
from smollm_stack.tokenizer.pretokenize import find_cut, special_pattern


def chunk_bounds(path: str, chunk_bytes: int, special_tokens) -> list[tuple[int, int]]:
    """Split a file into (start, end) byte ranges of about chunk_bytes, cut only at safe positions."""
    size = os.path.getsize(path)
    specials = special_pattern(special_tokens)
    max_special = max((len(s.encode("utf-8")) for s in special_tokens or []), default=1)
    window_bytes = max(1 << 16, 4 * max_special)
    chunk_bytes = max(chunk_bytes, max_special)  # windows start max_special bytes before the target
    bounds, start = [], 0
    with open(path, "rb") as f:
        while size - start > chunk_bytes:
            target, cut = start + chunk_bytes, -1
            while cut < 0 and target < size:
                f.seek(target - max_special)
                window = f.read(window_bytes)
                if target - max_special + len(window) >= size:  # nothing past the end can hide a special token
                    window += b"\0" * max_special
                cut = find_cut(window, max_special, specials, max_special)
                cut = cut + target - max_special if cut >= 0 else -1
                target += len(window) - 2 * max_special + 1
            if cut < 0:
                break
            bounds.append((start, cut))
            start = cut
    bounds.append((start, size))
    return bounds


def read_chunk(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    check_utf8(raw, start, path)
    return raw


def trim_heap():
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    Encoding allocates and frees a few chunk-sized buffers per chunk. glibc's adaptive mmap threshold soon serves
    them from the heap, whose free space then fragments and stays resident: without a trim after each chunk, an
    encode's memory grows with the file instead of staying flat (bench/records/2026-12-07-data-scale).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


@contextlib.contextmanager
def process_pool(n: int):
    """n forked worker processes (they inherit the loaded JIT code and tables), or None to run in-process."""
    if n <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(n)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    # Let the workers drain and exit on their own: terminating them mid-task can leave the task queue's lock held.
    pool.close()
    pool.join()


def ordered_map(pool, fn, tasks, window: int):
    """Yield fn(task) for each task in order, computed by ``pool`` (None: here) with at most ``window`` in flight.

    ``tasks`` may be a generator over more data than memory holds: it is consumed only as results are taken
    (``Pool.imap`` would read it all ahead).
    """
    if pool is None:
        yield from map(fn, tasks)
        return
    in_flight = collections.deque()
    for task in tasks:
        in_flight.append(pool.apply_async(fn, (task,)))
        if len(in_flight) >= window:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()
