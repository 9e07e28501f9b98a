"""Checks of what callers pass in, each raising one clear error that names the file, token or byte at fault."""

import os


def check_special_tokens(special_tokens) -> list[str]:
    """The special tokens as a list of distinct non-empty str (None means none)."""
    special_tokens = list(special_tokens or [])
    for s in special_tokens:
        if not isinstance(s, str):
            raise TypeError(f"special tokens must be str, got {type(s).__name__}")
        if not s:
            raise ValueError("special tokens must be non-empty strings")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"duplicate special tokens in {special_tokens}")
    return special_tokens


def check_utf8(raw: bytes, base: int = 0, name: str = "input") -> None:
    """Raise ValueError naming the byte offset of the first byte that is not UTF-8 (we never replace silently)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{name} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {base + e.start} ({e.reason})"
        ) from None


def check_input_path(path) -> str:
    """The path as a str, if it names an existing file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, expected a UTF-8 text file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    return path
