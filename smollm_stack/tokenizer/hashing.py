"""Open-addressing hash tables on plain arrays, shared by the jitted trainer and encoder.

Two kinds: int64 keys (token pairs, (a << 32) | b) in a 1-D key array, and byte-string keys (pre-tokens) in a 2-D
int64 row table. A byte-string row keeps the hash, the key's first 8 bytes and its length inline, so almost every
lookup (pre-tokens are short) is settled by one row read without touching the bytes themselves.
"""

import numba
import numpy as np

EMPTY = -1
FIB = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: multiplicative hashing
HASH, KEY0, START, LEN, VAL, VAL2 = range(6)  # columns of a byte-string table; HASH == 0 marks an empty row


@numba.njit(cache=True)
def log2_ceil(n):
    b = 0
    while (1 << b) < n:
        b += 1
    return b


@numba.njit(cache=True)
def reserve(arr, need):
    """arr, or a copy with room for at least `need` elements (doubling, so appends stay amortized O(1))."""
    if need <= arr.shape[0]:
        return arr
    out = np.empty(max(need, 2 * arr.shape[0]), arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@numba.njit(cache=True)
def find_int(keys, key):
    """Slot of an int64 key in a power-of-two table, or the empty slot where it would go."""
    mask = keys.shape[0] - 1
    slot = np.int64((np.uint64(key) * FIB) >> np.uint64(32)) & mask
    while keys[slot] != EMPTY and keys[slot] != key:
        slot = (slot + 1) & mask
    return slot


@numba.njit(cache=True)
def hash_bytes(data, i, j):
    """(hash, first 8 bytes as a little-endian int) of data[i:j]; the hash is > 0."""
    h = np.uint64(j - i) * FIB
    key0 = np.uint64(0)
    q = i
    while q < j:
        w = np.uint64(0)
        for r in range(min(8, j - q)):
            w |= np.uint64(data[q + r]) << np.uint64(8 * r)
        if q == i:
            key0 = w
        h = (h ^ w) * FIB
        h ^= h >> np.uint64(29)
        q += 8
    return np.int64(h >> np.uint64(1)) | 1, np.int64(key0)


@numba.njit(cache=True)
def find_bytes(table, h, key0, store, data, i, n):
    """Row of the key data[i:i + n] (hash h, first word key0), or the empty row where it would go. Keys longer than
    8 bytes are compared in full against store[table[row, START]:]."""
    mask = table.shape[0] - 1
    row = h & mask
    while table[row, HASH] != 0:
        if table[row, HASH] == h and table[row, KEY0] == key0 and table[row, LEN] == n:
            s = table[row, START]
            same = True
            for q in range(8, n):
                if store[s + q] != data[i + q]:
                    same = False
                    break
            if same:
                return row
        row = (row + 1) & mask
    return row


@numba.njit(cache=True)
def grow_bytes_table(table):
    """The same rows in a table twice the size."""
    out = np.zeros((2 * table.shape[0], table.shape[1]), np.int64)
    mask = out.shape[0] - 1
    for r in range(table.shape[0]):
        if table[r, HASH] != 0:
            row = table[r, HASH] & mask
            while out[row, HASH] != 0:
                row = (row + 1) & mask
            out[row] = table[r]
    return out
