"""Byte-level BPE training: parallel pre-token counting, then an incremental Numba merge loop.

Step 1 (pre-tokenization, parallel): the file is cut into chunks at safe positions (see pretokenize.py), each worker
splits its chunk on special tokens, runs the GPT-2 scanner and counts distinct pre-tokens in a hash table; the main
process adds the counts up. Memory grows with the number of distinct pre-tokens, not with the corpus.

Step 2 (merging, one core): merge.py's incremental Numba merge loop over the counted pre-tokens.

Inputs up to SMALL_BYTES go to small.py's pure-Python trainer instead while the JIT is not yet loaded in this process:
on a fresh install, compiling the Numba code costs far more than that trainer takes
(bench/records/2026-12-07-tokenizer-first-call).
"""

import os
import threading

import numba
import numpy as np
from tqdm.auto import tqdm

from smollm_stack.tokenizer.hashing import HASH, KEY0, LEN, START, VAL, find_bytes, grow_bytes_table, hash_bytes
from smollm_stack.tokenizer.inputs import check_input_path, check_special_tokens
from smollm_stack.tokenizer.merge import merge_loop
from smollm_stack.tokenizer.parallel import chunk_bounds, ordered_map, process_pool, read_chunk
from smollm_stack.tokenizer.pretokenize import char_classes, next_pretoken, segments, special_pattern
from smollm_stack.tokenizer.small import count_small, merge_small

MIN_CHUNK_BYTES = 1 << 20  # smaller chunks cost more in process overhead than they gain in balance
SMALL_BYTES = 4 << 20  # up to this size a cold first call trains faster in pure Python than it compiles the JIT


@numba.njit(cache=True, nogil=True)
def count_pretokens(data, bounds, classes):
    """Count the distinct pre-tokens in the segments data[bounds[k, 0]:bounds[k, 1]].

    Returns (starts, lengths, counts) of each distinct pre-token, pointing at its first occurrence in data.
    """
    table = np.zeros((1 << 12, 6), np.int64)
    n = 0
    for k in range(bounds.shape[0]):
        i, end = bounds[k, 0], bounds[k, 1]
        while i < end:
            j = next_pretoken(data, i, end, classes)
            h, key0 = hash_bytes(data, i, j)
            row = find_bytes(table, h, key0, data, data, i, j - i)
            if table[row, HASH] != 0:
                table[row, VAL] += 1
            else:
                table[row, HASH], table[row, KEY0], table[row, START], table[row, LEN], table[row, VAL] = (
                    h, key0, i, j - i, 1
                )  # fmt: skip
                n += 1
                if 2 * n > table.shape[0]:  # keep the load under 1/2
                    table = grow_bytes_table(table)
            i = j
    used = table[table[:, HASH] != 0]
    return used[:, START], used[:, LEN], used[:, VAL]


def _count_chunk(args):
    path, start, end, special_tokens = args
    return _count_raw(read_chunk(path, start, end), special_tokens)


def _count_batch(args):
    return _count_raw(*args)


def _count_raw(raw: bytes, special_tokens):
    bounds, _ = segments(raw, special_pattern(special_tokens))
    starts, lens, counts = count_pretokens(np.frombuffer(raw, np.uint8), bounds, char_classes())
    return [raw[s : s + n] for s, n in zip(starts.tolist(), lens.tolist())], counts.tolist(), len(raw)


def count_file(path, special_tokens, num_workers, progress=True) -> dict[bytes, int]:
    """{pre-token bytes: count} over the whole file, in parallel over chunks."""
    size = os.path.getsize(path)
    chunk_bytes = int(min(max(size / (4 * num_workers), MIN_CHUNK_BYTES), 16 << 20))
    tasks = [(path, s, e, special_tokens) for s, e in chunk_bounds(path, chunk_bytes, special_tokens)]
    return _add_counts(_count_chunk, tasks, min(num_workers, len(tasks)), size, progress)


def _add_counts(fn, tasks, num_workers: int, size, progress: bool) -> dict[bytes, int]:
    char_classes()  # built once here, inherited by forked workers
    totals: dict[bytes, int] = {}
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="pre-tokenize", disable=not progress)
    with bar, process_pool(num_workers) as pool:
        for pieces, counts, nbytes in ordered_map(pool, fn, tasks, 2 * num_workers):
            if not totals:
                totals = dict(zip(pieces, counts))
            else:
                get = totals.get
                for p, c in zip(pieces, counts):
                    totals[p] = get(p, 0) + c
            bar.update(nbytes)
    return totals


def train_bpe(
    input_path, vocab_size: int, special_tokens=None, num_workers: int | None = None, progress=False, jit=None
):
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Returns (vocab, merges): vocab maps ids 0..n-1 to bytes (the special tokens first, then the 256 single bytes, then
    one token per merge in creation order; fewer than vocab_size when the corpus runs out of pairs), and merges lists
    the (left, right) byte pairs in creation order. ``jit``: the Numba path (True) or the pure-Python one (False);
    by default Python for a file up to SMALL_BYTES until the JIT is loaded, the same result either way.
    """
    path = check_input_path(input_path)
    special_tokens = _check_vocab(vocab_size, special_tokens)
    if jit is None:
        jit = os.path.getsize(path) > SMALL_BYTES or bool(merge_loop.signatures and count_pretokens.signatures)
    if not jit:
        merges = merge_small(count_small(path, special_tokens), vocab_size - 256 - len(special_tokens))
        return vocab_of(merges, special_tokens), merges
    num_workers = num_workers or os.cpu_count() or 1
    return merge_counts(count_file(path, special_tokens, num_workers, progress), vocab_size, special_tokens, progress)


def train_bpe_batches(batches, vocab_size: int, special_tokens=None, num_workers: int | None = None, progress=False):
    """train_bpe on text that arrives as an iterable of UTF-8 ``bytes`` batches (documents streamed from jsonl or
    parquet), each ending right after a special token (or at the end); the result equals train_bpe's on the
    concatenation, with at most two batches per worker in memory."""
    special_tokens = _check_vocab(vocab_size, special_tokens)
    num_workers = num_workers or os.cpu_count() or 1
    tasks = ((raw, special_tokens) for raw in batches)
    counts = _add_counts(_count_batch, tasks, num_workers, None, progress)
    return merge_counts(counts, vocab_size, special_tokens, progress)


def _check_vocab(vocab_size, special_tokens) -> list[str]:
    special_tokens = check_special_tokens(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    return special_tokens


def merge_counts(counts: dict[bytes, int], vocab_size: int, special_tokens: list[str], progress=False):
    """Step 2 of train_bpe: run the merges over {pre-token bytes: count}; returns (vocab, merges)."""
    words = list(counts)
    toks = np.frombuffer(b"".join(words), np.uint8).astype(np.int32)
    wlen = np.fromiter(map(len, words), np.int64, len(words))
    wstart = np.cumsum(wlen) - wlen
    wcount = np.fromiter(counts.values(), np.int64, len(words))
    n_merges = vocab_size - 256 - len(special_tokens)
    done, result = np.zeros(1, np.int64), []
    worker = threading.Thread(target=lambda: result.append(merge_loop(toks, wstart, wlen, wcount, n_merges, done)))
    with tqdm(total=n_merges, desc="merge", unit="merge", disable=not progress) as bar:
        worker.start()
        while worker.is_alive():  # merge_loop releases the GIL, so the bar can follow it
            worker.join(0.1)
            bar.update(int(done[0]) - bar.n)
        bar.update(int(done[0]) - bar.n)
    out_a, out_b = result[0]

    token_bytes = [bytes([i]) for i in range(256)]
    merges = []
    for a, b in zip(out_a.tolist(), out_b.tolist()):
        merges.append((token_bytes[a], token_bytes[b]))
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return vocab_of(merges, special_tokens), merges


def vocab_of(merges: list[tuple[bytes, bytes]], special_tokens: list[str]) -> dict[int, bytes]:
    """{id: bytes}: the special tokens, the 256 single bytes, then one token per merge in creation order."""
    tokens = [s.encode("utf-8") for s in special_tokens] + [bytes([i]) for i in range(256)]
    return dict(enumerate(tokens + [a + b for a, b in merges]))
