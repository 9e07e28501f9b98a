"""Slow, obviously-correct pure-Python BPE: the spec that the fast trainer and encoder are tested against.

No incremental updates, no caches, no Numba: every merge recounts every pair of every distinct pre-token.
"""

from collections import Counter

import regex

from smollm_stack.tokenizer.pretokenize import GPT2_PATTERN


def split_special(text: str, special_tokens) -> list[str]:
    """Split text into chunks, each either a special token or the text between two of them (longest match first)."""
    if not special_tokens:
        return [text]
    ordered = sorted(special_tokens, key=len, reverse=True)
    return regex.split("(" + "|".join(map(regex.escape, ordered)) + ")", text)


def train_bpe_reference(text: str, vocab_size: int, special_tokens=()) -> tuple[dict[int, bytes], list]:
    words = Counter()
    for chunk in split_special(text, special_tokens):
        if chunk not in special_tokens:
            words.update(regex.findall(GPT2_PATTERN, chunk))
    words = {tuple(bytes([b]) for b in w.encode("utf-8")): c for w, c in words.items()}
    merges = []
    while 256 + len(special_tokens) + len(merges) < vocab_size:
        pairs = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # most frequent, then the greater (bytes, bytes) tuple
        merges.append(best)
        words = {_merge(w, best): c for w, c in words.items()}
    vocab = {i: s.encode("utf-8") for i, s in enumerate(special_tokens)}
    tokens = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    vocab.update({len(special_tokens) + i: t for i, t in enumerate(tokens)})
    return vocab, merges


def _merge(word: tuple, pair: tuple) -> tuple:
    """Replace each non-overlapping occurrence of pair, left to right: _merge((a, a, a), (a, a)) == (aa, a)."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def encode_reference(text: str, vocab: dict[int, bytes], merges: list, special_tokens=()) -> list[int]:
    """Encode like GPT-2: inside each pre-token, repeatedly merge the pair with the lowest merge rank."""
    ids_of = {b: i for i, b in vocab.items()}
    rank = {pair: r for r, pair in enumerate(merges)}
    ids = []
    for chunk in split_special(text, special_tokens):
        if chunk in special_tokens:
            ids.append(ids_of[chunk.encode("utf-8")])
            continue
        for piece in regex.findall(GPT2_PATTERN, chunk):
            word = tuple(bytes([b]) for b in piece.encode("utf-8"))
            while len(word) > 1:
                best = min(zip(word, word[1:]), key=lambda p: rank.get(p, float("inf")))
                if best not in rank:
                    break
                word = _merge(word, best)
            ids.extend(ids_of[t] for t in word)
    return ids
