"""Pre-tokenization: the GPT-2 regex, reimplemented as a Numba scanner over UTF-8 bytes, plus special-token splitting
and the positions where text can be cut into independent pieces. Pure functions of bytes and text: reading files in
chunks is tokenizer/parallel.py's, checking inputs tokenizer/inputs.py's.

The GPT-2 pattern

    '(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

is simple enough to run as a hand-written scanner: every character falls in one of four classes (letter, number,
whitespace, other), and each alternative is a run of one class, optionally led by a space. The `regex` package runs it
at ~7 MB/s per core on this machine, which would be the whole time budget of training and encoding; the scanner runs
at several times that. The class table is built from `regex` itself, so both agree on every code point; the tests hold
the scanner equal to `regex.findall` on random unicode text.

Safe cuts: text is cut only where the pre-tokens of the two halves are exactly those of the whole, so that N workers
give the same result as one. Two kinds of cuts are safe: right before a special token (text is split on specials
first anyway), and between a printable non-space ASCII byte and a space or newline. At the latter, the match that
covers the non-space character can't extend into whitespace, the whitespace-run alternatives never look back, and no
lookahead from the left half reaches past its last character, which isn't whitespace. Neither cut may fall inside a
special-token occurrence. Text with no such position for a long stretch (e.g. unbroken CJK text) gets longer pieces.
"""

import functools
import re

import numba
import numpy as np
import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3


@functools.cache
def char_classes() -> np.ndarray:
    """uint8 class of every code point (OTHER/LETTER/NUMBER/SPACE), taken from the `regex` package (~0.3 s)."""
    everything = "".join(map(chr, range(0x110000)))
    classes = np.zeros(0x110000, np.uint8)
    for cls, pattern in ((LETTER, r"\p{L}+"), (NUMBER, r"\p{N}+"), (SPACE, r"\s+")):
        for m in regex.finditer(pattern, everything):
            classes[m.start() : m.end()] = cls
    return classes


@numba.njit(cache=True)
def _decode(data, i):
    """(code point, byte length) of the UTF-8 character at data[i]; the input is valid UTF-8."""
    b0 = np.int64(data[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F), 2
    if b0 < 0xF0:
        return ((b0 & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | (np.int64(data[i + 2]) & 0x3F), 3
    cp = ((b0 & 0x07) << 18) | ((np.int64(data[i + 1]) & 0x3F) << 12) | ((np.int64(data[i + 2]) & 0x3F) << 6)
    return cp | (np.int64(data[i + 3]) & 0x3F), 4


@numba.njit(cache=True)
def _run_end(data, i, end, classes, cls):
    """End of the run of characters of class `cls` starting at byte i."""
    while i < end:
        cp, n = _decode(data, i)
        if classes[cp] != cls:
            break
        i += n
    return i


@numba.njit(cache=True)
def next_pretoken(data, i, end, classes):
    """End (byte offset) of the GPT-2 pre-token that starts at data[i], within the segment data[:end].

    Worked example on b"I've  got 42!!\\n": I | 've | ' ' | ' got' | ' 42' | '!!' | '\\n'.
    """
    cp, n = _decode(data, i)
    if cp == 0x27 and i + 1 < end:  # '(?:[sdmt]|ll|ve|re)
        c1 = data[i + 1]
        if c1 == 0x73 or c1 == 0x64 or c1 == 0x6D or c1 == 0x74:
            return i + 2
        if i + 2 < end:
            c2 = data[i + 2]
            if (c1 == 0x6C and c2 == 0x6C) or (c1 == 0x76 and c2 == 0x65) or (c1 == 0x72 and c2 == 0x65):
                return i + 3
    cls = classes[cp]
    if cp == 0x20 and i + 1 < end:  # ' ?' before a letter, number or other run
        cp1, _ = _decode(data, i + 1)
        cls1 = classes[cp1]
        if cls1 != SPACE:
            return _run_end(data, i + 1, end, classes, cls1)
    if cls != SPACE:
        return _run_end(data, i + n, end, classes, cls)
    j = _run_end(data, i + n, end, classes, SPACE)
    if j == end or j - i == n:  # \s+(?!\S) to the end, or a lone space before \S (\s+)
        return j
    # \s+(?!\S) backs off one character so the last space can lead the next word
    k = i
    while True:
        _, m = _decode(data, k)
        if k + m == j:
            return k
        k += m


@numba.njit(cache=True)
def pretoken_ends(data, start, end, classes, out, n_out):
    """Append the end offsets of the pre-tokens of data[start:end] to out[n_out:]; return the new count."""
    i = start
    while i < end:
        i = next_pretoken(data, i, end, classes)
        out[n_out] = i
        n_out += 1
    return n_out


def pretokenize(text: str) -> list[str]:
    """The GPT-2 pre-tokens of `text` (no special-token handling): equal to regex.findall(GPT2_PATTERN, text)."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    ends = np.empty(len(data), np.int64)
    ends = ends[: pretoken_ends(data, 0, len(data), char_classes(), ends, 0)]
    starts = np.concatenate([[0], ends[:-1]]).tolist()
    raw = data.tobytes()
    return [raw[s:e].decode("utf-8") for s, e in zip(starts, ends.tolist())]


def special_pattern(special_tokens) -> re.Pattern | None:
    """Bytes regex matching any special token, longest first so "<|a|><|a|>" wins over "<|a|>"."""
    if not special_tokens:
        return None
    ordered = sorted({s.encode("utf-8") for s in special_tokens}, key=len, reverse=True)
    return re.compile(b"|".join(map(re.escape, ordered)))


_SAFE_CUT = re.compile(rb"(?<=[\x21-\x7e])[ \n]")


def find_cut(window: bytes, target: int, specials: re.Pattern | None, max_special: int) -> int:
    """First safe cut position >= target in window (see module docstring), or -1 if there is none.

    target >= max_special and cuts stay max_special bytes before the window's end, so that every special-token
    occurrence spanning a candidate lies inside the window.
    """
    limit, pos = len(window) - max_special, target
    while pos <= limit:
        found = [m.start() for m in (_SAFE_CUT.search(window, pos), specials and specials.search(window, pos)) if m]
        if not found or min(found) > limit:
            return -1
        cut = min(found)
        if not any((m := specials.match(window, i)) and m.end() > cut for i in range(cut - max_special + 1, cut)):
            return cut
        pos = cut + 1
    return -1


def segments(raw: bytes, specials: re.Pattern | None) -> tuple[np.ndarray, list[bytes]]:
    """Byte ranges between special tokens as an (n, 2) int64 array, and the special token found after each range."""
    if specials is None:
        return np.array([[0, len(raw)]], np.int64), []
    bounds, found, pos = [], [], 0
    for m in specials.finditer(raw):
        bounds.append((pos, m.start()))
        found.append(m.group())
        pos = m.end()
    bounds.append((pos, len(raw)))
    return np.array(bounds, np.int64).reshape(-1, 2), found
