"""Bits per byte: validation loss in a unit that does not depend on the tokenizer, so runs with different ones compare.

A model's loss in nats per token rewards a tokenizer with long tokens: fewer tokens cover the same text. Bits per byte
counts the information the model needs per byte of text instead:

    bpb = (sum over the target tokens of their loss in nats) / ln 2 / (UTF-8 bytes those targets decode to)

Each token's byte length comes from the tokenizer's vocabulary (a byte-level BPE token is a byte string, so the
lengths of a sequence's tokens add up to the bytes of its decoded text, even where a token ends mid-character).
Special tokens such as ``<|endoftext|>`` and padding ids past the tokenizer's vocabulary count 0 bytes: they stand
for no text, but the loss of predicting them still counts (a document boundary is information the model must supply).

The trainer's validation windows are fixed for the whole run, all of the same length, so their mean loss times the
token count is the sum above, and bpb = mean loss x (tokens / (ln 2 x bytes)): a constant factor, computed once.
"""

import math

import numpy as np


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: UTF-8 bytes of each token id; 0 for special tokens and ids the tokenizer lacks."""
    lengths = np.zeros(vocab_size, np.int64)
    for i, token in tokenizer.vocab.items():
        if i < vocab_size:
            lengths[i] = len(token)
    for special in tokenizer.special_tokens:
        lengths[tokenizer.special_token_id(special)] = 0
    return lengths


def bits_per_byte_factor(data: np.ndarray, starts, context_length: int, lengths: np.ndarray) -> float | None:
    """The factor taking the mean loss over the windows' targets ``data[s + 1 : s + T + 1]`` to bits per byte.

    None when the targets decode to no bytes at all (only special tokens).
    """
    total_bytes = sum(int(lengths[np.asarray(data[s + 1 : s + context_length + 1])].sum()) for s in starts)
    if total_bytes == 0:
        return None
    return len(starts) * context_length / (math.log(2) * total_bytes)


def bits_per_byte(loss: float, factor: float | None) -> float | None:
    """Validation loss (nats/token) in bits per byte; None without a tokenizer to count bytes with."""
    return None if factor is None else loss * factor
