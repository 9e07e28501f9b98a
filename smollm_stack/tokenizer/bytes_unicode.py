"""GPT-2's byte <-> unicode alphabet: how vocab.json and merges.txt (ours, GPT-2's, Hugging Face's) write tokens,
which are arbitrary bytes, as printable text.

    text_to_bytes("Ġthe") == b" the"      bytes_to_text(b"\\n") == "Ċ"
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: printable Latin-1 maps to itself, the rest
    (control characters, space, ...) to U+0100 onwards, so 0x20 becomes 'Ġ' and 0x0A becomes 'Ċ'."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def bytes_to_text(token: bytes) -> str:
    """A token's bytes in GPT-2's alphabet, as vocab.json and merges.txt write it."""
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def text_to_bytes(text: str, where: str) -> bytes:
    """The bytes of a token written in GPT-2's alphabet; ValueError naming `where` (a file) for any other character."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ValueError(f"{where}: {text!r} has {e.args[0]!r}, which is not in GPT-2's byte alphabet") from None
