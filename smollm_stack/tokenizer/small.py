"""Byte-level BPE training in pure Python for small inputs: nothing to compile, so a first call is fast.

The Numba trainer spends seconds compiling before a fresh install's first call reads a byte
(bench/records/2026-12-07-tokenizer-first-call); on a few MB of text this trainer is done sooner. Pre-tokens are counted
with the ``regex`` GPT-2 pattern, as the reference does, and the merges are incremental: each pair's count and the words
that hold it change only for the words a merge touches, and the best pair comes off a heap whose stale entries are
skipped. Its merges are the reference's and the Numba trainer's (ties go to the greater (left, right) pair of byte
strings).
"""

import heapq
from collections import Counter, defaultdict

import regex

from smollm_stack.tokenizer.inputs import check_utf8
from smollm_stack.tokenizer.pretokenize import GPT2_PATTERN
from smollm_stack.tokenizer.reference import split_special


def count_small(path: str, special_tokens: list[str]) -> Counter:
    """{pre-token str: count} of a UTF-8 file, split at the special tokens (which are not counted)."""
    with open(path, "rb") as f:
        raw = f.read()
    check_utf8(raw, 0, path)
    words, pattern = Counter(), regex.compile(GPT2_PATTERN)
    for chunk in split_special(raw.decode("utf-8"), special_tokens):
        if chunk not in special_tokens:
            words.update(pattern.findall(chunk))
    return words


class _Greater:
    """A byte string that sorts first when greater, so the min-heap pops ties as the greater pair."""

    __slots__ = ("b",)

    def __init__(self, b: bytes):
        self.b = b

    def __lt__(self, other):
        return self.b > other.b

    def __eq__(self, other):  # tuples compare by == first: equal left tokens must fall through to the right ones
        return self.b == other.b


def merge_small(words: Counter, n_merges: int) -> list[tuple[bytes, bytes]]:
    """Up to ``n_merges`` merges over {pre-token: count}, in creation order."""
    seqs = [list(w.encode("utf-8")) for w in words]
    counts = list(words.values())
    token = [bytes([i]) for i in range(256)]
    pair_count, holders = defaultdict(int), defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += counts[i]
            holders[pair].add(i)
    heap = [(-c, _Greater(token[a]), _Greater(token[b]), a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < n_merges:
        negative, _, _, a, b = heapq.heappop(heap)
        if pair_count.get((a, b)) != -negative:
            continue  # stale: the count changed after this entry was pushed
        merges.append((token[a], token[b]))
        token.append(token[a] + token[b])
        changed = _apply(seqs, counts, holders.pop((a, b)), (a, b), len(token) - 1, pair_count, holders)
        for pair in changed:
            if pair_count.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_count[pair], _Greater(token[pair[0]]), _Greater(token[pair[1]]), *pair))
    return merges


def _apply(seqs, counts, words, pair, new: int, pair_count, holders) -> set:
    """Merge ``pair`` into ``new`` in each of ``words``, moving their pair counts; returns the pairs changed."""
    changed = set()
    for i in words:
        seq, c = seqs[i], counts[i]
        for p in zip(seq, seq[1:]):
            pair_count[p] -= c
            changed.add(p)
        out, j = [], 0
        while j < len(seq):
            if j + 1 < len(seq) and (seq[j], seq[j + 1]) == pair:
                out.append(new)
                j += 2
            else:
                out.append(seq[j])
                j += 1
        seqs[i] = out
        for p in zip(out, out[1:]):
            pair_count[p] += c
            holders[p].add(i)
            changed.add(p)
    pair_count.pop(pair, None)
    return changed
