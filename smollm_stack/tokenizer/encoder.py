"""Numba kernels for encoding: the GPT-2 scanner, a pre-token -> ids cache, and merge-by-rank on cache misses.

Everything between two special tokens runs in one jitted call per chunk of text, so Python never touches individual
pre-tokens. Most pre-tokens repeat (Zipf), so the cache answers nearly all of them; a miss runs GPT-2's `bpe()`:
repeatedly merge every occurrence of the adjacent pair with the lowest merge rank. The cache has a fixed size and is
cleared when full, which keeps memory flat on corpora of any size.
"""

import numba
import numpy as np

from smollm_stack.tokenizer.hashing import (
    EMPTY, HASH, KEY0, LEN, START, VAL, VAL2, find_bytes, find_int, hash_bytes, log2_ceil
)
from smollm_stack.tokenizer.pretokenize import next_pretoken

# The pre-token -> ids cache: a table of CACHE_ROWS rows (at most half used; START = offset of the key bytes, VAL =
# offset of the ids, VAL2 = their number) and two arenas, 10 MB in all. Bigger tables measured slower with 2 workers:
# the lookups are random accesses, and a table that stays in the CPU caches beats one that holds more pre-tokens.
CACHE_ROWS = 1 << 17
CACHE_KEY_BYTES = 1 << 21
CACHE_IDS = 1 << 19


@numba.njit(cache=True)
def build_rank_table(left, right):
    """Open-addressing table from pair key (left << 32) | right to merge rank (the earliest merge wins)."""
    keys = np.full(1 << max(4, log2_ceil(4 * left.shape[0])), EMPTY, np.int64)
    ranks = np.empty(keys.shape[0], np.int64)
    for r in range(left.shape[0]):
        key = (np.int64(left[r]) << 32) | right[r]
        slot = find_int(keys, key)
        if keys[slot] == EMPTY:
            keys[slot], ranks[slot] = key, r
    return keys, ranks


def new_cache():
    return (
        np.zeros((CACHE_ROWS, 6), np.int64),
        np.empty(CACHE_KEY_BYTES, np.uint8),
        np.empty(CACHE_IDS, np.int32),
        np.zeros(3, np.int64),  # slots used, key bytes used, ids used
    )


@numba.njit(cache=True)
def _bpe(buf, n, rank_keys, rank_vals, left, right, new_id):
    """Merge buf[:n] (token ids) in place by rank; return the new length.

    Example with merges [(h, e), (l, l), (he, ll)]: h e l l o -> he l l o -> he ll o -> hell o.
    """
    while n > 1:
        best = np.int64(1) << 62
        for q in range(n - 1):
            slot = find_int(rank_keys, (np.int64(buf[q]) << 32) | buf[q + 1])
            if rank_keys[slot] != EMPTY and rank_vals[slot] < best:
                best = rank_vals[slot]
        if best == np.int64(1) << 62:
            break
        a, b, t = left[best], right[best], new_id[best]
        q = 0
        o = 0
        while q < n:
            if q + 1 < n and buf[q] == a and buf[q + 1] == b:
                buf[o] = t
                q += 2
            else:
                buf[o] = buf[q]
                q += 1
            o += 1
        n = o
    return n


@numba.njit(cache=True, nogil=True)
def encode_segments(data, bounds, special_ids, classes, byte_ids, rank_keys, rank_vals, left, right, new_id, cache):
    """Token ids of data: the segments data[bounds[k, 0]:bounds[k, 1]] are pre-tokenized and merged, each followed by
    special_ids[k] when that is >= 0. cache = new_cache() arrays, updated in place.
    """
    table, key_bytes, cached_ids, used = cache
    out = np.empty(data.shape[0] + bounds.shape[0], np.int32)  # every token covers >= 1 byte
    n_out = 0
    buf = np.empty(64, np.int32)
    for k in range(bounds.shape[0]):
        i, end = bounds[k, 0], bounds[k, 1]
        while i < end:
            j = next_pretoken(data, i, end, classes)
            n = j - i
            h, key0 = hash_bytes(data, i, j)
            row = find_bytes(table, h, key0, key_bytes, data, i, n)
            if table[row, HASH] != 0:
                s, m = table[row, VAL], table[row, VAL2]
                out[n_out : n_out + m] = cached_ids[s : s + m]
                n_out += m
                i = j
                continue
            if n > buf.shape[0]:
                buf = np.empty(2 * n, np.int32)
            for q in range(n):
                buf[q] = byte_ids[data[i + q]]
            m = _bpe(buf, n, rank_keys, rank_vals, left, right, new_id)
            out[n_out : n_out + m] = buf[:m]
            n_out += m
            i = j
            if 4 * n > key_bytes.shape[0] or 4 * m > cached_ids.shape[0]:
                continue  # too big to cache
            full = 2 * (used[0] + 1) > table.shape[0]
            if full or used[1] + n > key_bytes.shape[0] or used[2] + m > cached_ids.shape[0]:
                table[:, HASH] = 0  # full: start over rather than grow
                used[:] = 0
                row = h & (table.shape[0] - 1)
            table[row, HASH], table[row, KEY0], table[row, START], table[row, LEN] = h, key0, used[1], n
            table[row, VAL], table[row, VAL2] = used[2], m
            key_bytes[used[1] : used[1] + n] = data[i - n : i]
            cached_ids[used[2] : used[2] + m] = buf[:m]
            used[0] += 1
            used[1] += n
            used[2] += m
        if special_ids[k] >= 0:
            out[n_out] = special_ids[k]
            n_out += 1
    return out[:n_out]
