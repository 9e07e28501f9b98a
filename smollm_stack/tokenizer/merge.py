"""BPE merging, step 2 of training (trainer.py): the incremental Numba merge loop over counted pre-tokens.

The classic incremental algorithm, on one core. Each distinct pre-token ("word") is an array of token ids with a
count. We keep
  - pair counts in an open-addressing hash table keyed by (a << 32) | b,
  - for every pair a linked list of the words that contained it when it was created ("postings"; stale entries are
    harmless: the word is rescanned and simply has no occurrence),
  - a binary max-heap of (count, pair) with lazy invalidation: an entry whose count no longer matches is re-pushed
    with the current count when it surfaces, so only pairs whose count grows are pushed during a merge.
A merge rewrites only the words on the pair's postings list and adjusts the counts of the pairs next to each
occurrence. Ties go to the lexicographically greater (bytes(a), bytes(b)), compared byte by byte in the heap.

The loop reads top to bottom in merge_loop; each step it takes is one small @njit helper above it. A word's rewrite
(_merge_word) only notes the pair moves it causes; _move_pairs then applies them to the pair table. The helpers run
per word are inlined (inline="always"): as calls, each passing a dozen arrays, they made merging ~20% slower (CPU
time of merge_counts at vocab 20000 on 69k distinct pre-tokens, measured beside the single-function loop).
"""

import numba
import numpy as np

from smollm_stack.tokenizer.hashing import EMPTY, find_int, log2_ceil, reserve


@numba.njit(cache=True)
def _cmp_tokens(tb, tstart, tlen, x, y):
    """-1, 0 or 1 as bytes(x) <, ==, > bytes(y) (Python's bytes order: a proper prefix is smaller)."""
    lx, ly = tlen[x], tlen[y]
    sx, sy = tstart[x], tstart[y]
    for q in range(min(lx, ly)):
        if tb[sx + q] != tb[sy + q]:
            return -1 if tb[sx + q] < tb[sy + q] else 1
    return -1 if lx < ly else (1 if lx > ly else 0)


@numba.njit(cache=True)
def _above(c1, k1, c2, k2, tb, tstart, tlen):
    """Heap order: higher count first, then the lexicographically greater (bytes(a), bytes(b))."""
    if c1 != c2:
        return c1 > c2
    c = _cmp_tokens(tb, tstart, tlen, k1 >> 32, k2 >> 32)
    if c == 0:
        c = _cmp_tokens(tb, tstart, tlen, k1 & 0xFFFFFFFF, k2 & 0xFFFFFFFF)
    return c > 0


@numba.njit(cache=True)
def _heap_push(hc, hk, size, c, k, tb, tstart, tlen):
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if not _above(c, k, hc[parent], hk[parent], tb, tstart, tlen):
            break
        hc[i], hk[i] = hc[parent], hk[parent]
        i = parent
    hc[i], hk[i] = c, k
    return size + 1


@numba.njit(cache=True)
def _heap_pop(hc, hk, size, tb, tstart, tlen):
    """Remove the top entry (read it from hc[0], hk[0] first); return the new size."""
    size -= 1
    c, k = hc[size], hk[size]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and _above(hc[child + 1], hk[child + 1], hc[child], hk[child], tb, tstart, tlen):
            child += 1
        if not _above(hc[child], hk[child], c, k, tb, tstart, tlen):
            break
        hc[i], hk[i] = hc[child], hk[child]
        i = child
    hc[i], hk[i] = c, k
    return size


@numba.njit(cache=True, inline="always")
def _add_to_pair(keys, pcount, phead, post_word, post_next, n_post, key, w, c):
    """Add count c of word w to pair `key` (inserting the pair if new) and post w on its list.

    Returns (1 if the pair is new else 0, the new number of postings).
    """
    slot = find_int(keys, key)
    new = 0
    if keys[slot] == EMPTY:
        keys[slot] = key
        new = 1
    pcount[slot] += c
    post_word[n_post], post_next[n_post] = w, phead[slot]
    phead[slot] = n_post
    return new, n_post + 1


@numba.njit(cache=True)
def _count_initial_pairs(toks, wstart, wlen, wcount, keys, pcount, phead, post_word, post_next):
    """Every adjacent pair of every word, counted and posted; returns (number of pairs, number of postings)."""
    n_pairs, n_post = 0, 0
    for w in range(wstart.shape[0]):
        s = wstart[w]
        for i in range(wlen[w] - 1):
            key = (np.int64(toks[s + i]) << 32) | toks[s + i + 1]
            new, n_post = _add_to_pair(keys, pcount, phead, post_word, post_next, n_post, key, w, wcount[w])
            n_pairs += new
    return n_pairs, n_post


@numba.njit(cache=True)
def _rehash(keys, pcount, phead, pushed, keep):
    """The pair table at twice the size, without the pairs whose count fell to 0 (but `keep`, the pair being merged).

    Returns (keys, pcount, phead, pushed, number of pairs).
    """
    new_keys = np.full(2 * keys.shape[0], EMPTY, np.int64)
    new_count = np.zeros(new_keys.shape[0], np.int64)
    new_head = np.full(new_keys.shape[0], EMPTY, np.int64)
    new_pushed = np.full(new_keys.shape[0], EMPTY, np.int64)
    n_pairs = 0
    for q in range(keys.shape[0]):
        if keys[q] != EMPTY and (pcount[q] > 0 or keys[q] == keep):
            slot = find_int(new_keys, keys[q])
            new_keys[slot], new_count[slot], new_head[slot], new_pushed[slot] = keys[q], pcount[q], phead[q], pushed[q]
            n_pairs += 1
    return new_keys, new_count, new_head, new_pushed, n_pairs


@numba.njit(cache=True)
def _pop_best(hc, hk, hsize, keys, pcount, tb, tstart, tlen):
    """Pop until an entry matches its pair's current count; a stale entry of a live pair goes back with its count.

    Returns (the pair to merge, or EMPTY when none is left, the new heap size).
    """
    while hsize > 0:
        c, key = hc[0], hk[0]
        hsize = _heap_pop(hc, hk, hsize, tb, tstart, tlen)
        cur = pcount[find_int(keys, key)]
        if cur == c:
            return key, hsize
        if cur > 0:
            hsize = _heap_push(hc, hk, hsize, cur, key, tb, tstart, tlen)
    return EMPTY, hsize


@numba.njit(cache=True)
def _append_token(tb, tb_used, tstart, tlen, a, b, t):
    """Store the bytes of new token t = a + b (for tie-breaks); returns (tb, which may have grown, its used length)."""
    need = tb_used + tlen[a] + tlen[b]
    tb = reserve(tb, need)
    tb[tb_used : tb_used + tlen[a]] = tb[tstart[a] : tstart[a] + tlen[a]]
    tb[tb_used + tlen[a] : need] = tb[tstart[b] : tstart[b] + tlen[b]]
    tstart[t], tlen[t] = tb_used, tlen[a] + tlen[b]
    return tb, need


@numba.njit(cache=True, inline="always")
def _merge_word(toks, s, n, a, b, t, old_keys, new_keys, n_moves):
    """Replace each (a, b) in the word toks[s:s + n] by t, and note each pair beside an occurrence as a move
    old_keys[k] -> new_keys[k] (at most two per occurrence), from k = n_moves on.

    Returns (the word's new length, the new number of moves).
    """
    i, o = 0, 0  # read and write positions: writes lag reads, so toks[s + i - 1] is still the original left neighbour
    while i < n:
        if i + 1 < n and toks[s + i] == a and toks[s + i + 1] == b:
            if o > 0:  # (left, a) becomes (left', t), where left' is left or a t just written
                old_keys[n_moves] = (np.int64(toks[s + i - 1]) << 32) | a
                new_keys[n_moves] = (np.int64(toks[s + o - 1]) << 32) | t
                n_moves += 1
            # (b, right) becomes (t, right), unless the next occurrence starts at right: it moves that pair itself
            if i + 2 < n and not (i + 3 < n and toks[s + i + 2] == a and toks[s + i + 3] == b):
                old_keys[n_moves] = (np.int64(b) << 32) | toks[s + i + 2]
                new_keys[n_moves] = (np.int64(t) << 32) | toks[s + i + 2]
                n_moves += 1
            toks[s + o] = t
            i += 2
        else:
            toks[s + o] = toks[s + i]
            i += 1
        o += 1
    return o, n_moves


@numba.njit(cache=True, inline="always")
def _move_pairs(keys, pcount, phead, post_word, post_next, n_post, n_pairs, old_keys, new_keys, start, end, w, c):
    """Apply the moves old_keys[k] -> new_keys[k], start <= k < end, of word w (count c): the count goes from the old
    pair to the new one, which posts w. Returns (number of pairs, number of postings)."""
    for k in range(start, end):
        pcount[find_int(keys, old_keys[k])] -= c
        new, n_post = _add_to_pair(keys, pcount, phead, post_word, post_next, n_post, new_keys[k], w, c)
        n_pairs += new
    return n_pairs, n_post


@numba.njit(cache=True)
def _push_changed(hc, hk, hsize, keys, pcount, pushed, changed, n_changed, m, tb, tstart, tlen):
    """Push each pair whose count grew during merge m once, with its current count; returns (hc, hk, heap size)."""
    hc, hk = reserve(hc, hsize + n_changed), reserve(hk, hsize + n_changed)
    for q in range(n_changed):
        slot = find_int(keys, changed[q])
        if pushed[slot] != m:
            pushed[slot] = m
            hsize = _heap_push(hc, hk, hsize, pcount[slot], changed[q], tb, tstart, tlen)
    return hc, hk, hsize


@numba.njit(cache=True, nogil=True)
def merge_loop(toks, wstart, wlen, wcount, n_merges, progress):
    """Run up to n_merges BPE merges over the words (toks[wstart[w]:wstart[w] + wlen[w]], wcount[w]); tokens 0..255
    are the single bytes and merge m creates token 256 + m. Edits toks/wlen in place, writes the number of merges done
    so far to progress[0] and returns (left ids, right ids) of the merges in order (fewer if pairs run out).
    """
    n_words = wstart.shape[0]
    total = wlen.sum()
    # pair table: key, count, head of postings, and the merge that last pushed the pair (to push it once per merge);
    # sized for load <= 1/2 with 65536 byte pairs at first, rehashed as new tokens make new pairs
    cap = 1 << max(12, log2_ceil(4 * min(total, 1 << 16)))
    keys, pcount = np.full(cap, EMPTY, np.int64), np.zeros(cap, np.int64)
    phead, pushed = np.full(cap, EMPTY, np.int64), np.full(cap, EMPTY, np.int64)
    # postings (word, next posting): each merge occurrence adds at most two, and occurrences <= initial tokens
    post_word, post_next = np.empty(3 * total + 1, np.int32), np.empty(3 * total + 1, np.int32)
    # token bytes, for tie-breaks
    tstart, tlen = np.empty(256 + n_merges, np.int64), np.empty(256 + n_merges, np.int64)
    tb = np.empty(256 + 16 * n_merges, np.uint8)
    for t in range(256):
        tb[t], tstart[t], tlen[t] = t, t, 1
    tb_used = 256
    stamp = np.full(n_words, -1, np.int64)  # the last merge that rewrote the word (a word is posted once per pair)
    # the pair moves of the current merge (at most one per token): new_keys are the pairs whose count grew
    old_keys, new_keys = np.empty(total + 1, np.int64), np.empty(total + 1, np.int64)
    out_a, out_b = np.empty(n_merges, np.int32), np.empty(n_merges, np.int32)

    n_pairs, n_post = _count_initial_pairs(toks, wstart, wlen, wcount, keys, pcount, phead, post_word, post_next)
    hc, hk, hsize = np.empty(n_pairs, np.int64), np.empty(n_pairs, np.int64), 0  # the heap: (count, pair)
    for slot in range(cap):
        if keys[slot] != EMPTY:
            hsize = _heap_push(hc, hk, hsize, pcount[slot], keys[slot], tb, tstart, tlen)
    done = 0
    for m in range(n_merges):
        best, hsize = _pop_best(hc, hk, hsize, keys, pcount, tb, tstart, tlen)
        if best == EMPTY:
            break
        a, b, t = best >> 32, best & 0xFFFFFFFF, 256 + m
        out_a[m], out_b[m] = a, b
        tb, tb_used = _append_token(tb, tb_used, tstart, tlen, a, b, t)
        # rewrite each word on the pair's postings once, rehashing first where its new pairs could crowd the table
        n_moves = 0
        p = phead[find_int(keys, best)]
        while p != EMPTY:
            w, p = post_word[p], post_next[p]
            if stamp[w] == m:
                continue
            stamp[w] = m
            if 2 * (n_pairs + 2 * wlen[w]) > keys.shape[0]:
                keys, pcount, phead, pushed, n_pairs = _rehash(keys, pcount, phead, pushed, best)
            start = n_moves
            wlen[w], n_moves = _merge_word(toks, wstart[w], wlen[w], a, b, t, old_keys, new_keys, n_moves)
            n_pairs, n_post = _move_pairs(
                keys, pcount, phead, post_word, post_next, n_post, n_pairs, old_keys, new_keys, start, n_moves, w,
                wcount[w],
            )  # fmt: skip
        # the merged pair is gone; the pairs whose count grew go (back) on the heap
        best_slot = find_int(keys, best)
        pcount[best_slot], phead[best_slot] = 0, EMPTY
        hc, hk, hsize = _push_changed(hc, hk, hsize, keys, pcount, pushed, new_keys, n_moves, m, tb, tstart, tlen)
        done = m + 1
        progress[0] = done
    return out_a[:done], out_b[:done]


