"""The Tokenizer: encode/decode with a trained (or GPT-2) vocabulary, and the on-disk format.

On disk, a tokenizer directory holds (format version 2):
  vocab.json           {token: id}, one entry per line, tokens written with GPT-2's byte-to-unicode alphabet
  merges.txt           "#version: 0.2" then one merge per line, "left right" in the same alphabet, in rank order
  tokenizer_meta.json  {"format": "smollm-bpe", "version": 2, "pattern": ..., "special_tokens": [...], ...}
plus Hugging Face's tokenizer.json, tokenizer_config.json and special_tokens_map.json (see tokenizer/hf.py),
derived from the three above (load() reads HF's tokenizer.json only in a directory without ours). vocab.json and
merges.txt are byte-for-byte the GPT-2 / Hugging Face layout, so GPT-2's own files load with Tokenizer.from_files
and ours load in other tools.
Version 1 named the metadata file tokenizer.json, which is Hugging Face's name; load() still reads it.
"""

import gzip
import json
import os
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from smollm_stack.files import write_atomic
from smollm_stack.tokenizer import hf
from smollm_stack.tokenizer.bytes_unicode import bytes_to_text, text_to_bytes
from smollm_stack.tokenizer.encoder import build_rank_table, encode_segments, new_cache
from smollm_stack.tokenizer.inputs import check_input_path, check_special_tokens
from smollm_stack.tokenizer.pretokenize import GPT2_PATTERN, char_classes, find_cut, segments, special_pattern

FORMAT, VERSION, META_FILE = "smollm-bpe", 2, "tokenizer_meta.json"
# Every file save() writes (the refusal to overwrite a tokenizer directory checks these).
TOKENIZER_FILES = (
    "vocab.json", "merges.txt", META_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
)  # fmt: skip


class Tokenizer:
    """Byte-level BPE tokenizer. vocab: {id: bytes}; merges: [(left bytes, right bytes)] in rank order; special
    tokens not already in the vocab get the next free ids."""

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens=None):
        self.vocab = dict(vocab)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens = check_special_tokens(special_tokens)
        ids = {}
        for i, token in self.vocab.items():
            if not isinstance(i, int) or i < 0 or not isinstance(token, bytes):
                raise TypeError(f"vocab must map int ids >= 0 to bytes, got {i!r}: {token!r}")
            if ids.setdefault(token, i) != i:
                raise ValueError(f"vocab has token {token!r} twice (ids {ids[token]} and {i})")
        for s in self.special_tokens:
            token = s.encode("utf-8")
            if token not in ids:
                ids[token] = len(self.vocab)
                self.vocab[ids[token]] = token
        if sorted(self.vocab) != list(range(len(self.vocab))):
            raise ValueError(f"vocab ids must be 0..{len(self.vocab) - 1} without gaps")
        missing = [b for b in range(256) if bytes([b]) not in ids]
        if missing:
            raise ValueError(f"vocab lacks single byte(s) {missing[:5]}: a byte-level vocabulary needs all 256")
        self._ids = ids
        self._special_ids = {s: ids[s.encode("utf-8")] for s in self.special_tokens}
        self._specials = special_pattern(self.special_tokens)
        self._max_special = max((len(s.encode("utf-8")) for s in self.special_tokens), default=1)
        table = np.empty((len(self.merges), 3), np.int32)
        for r, (a, b) in enumerate(self.merges):
            if a not in ids or b not in ids or a + b not in ids:
                raise ValueError(f"merge {r} ({a!r}, {b!r}) uses or makes a token that is not in the vocab")
            table[r] = ids[a], ids[b], ids[a + b]
        self._left, self._right, self._new = (np.ascontiguousarray(table[:, k]) for k in range(3))
        self._rank_keys, self._rank_vals = build_rank_table(self._left, self._right)
        self._byte_ids = np.array([ids[bytes([b])] for b in range(256)], np.int32)
        self._decode_table = [self.vocab[i] for i in range(len(self.vocab))]
        self._local = threading.local()  # one cache per thread: the jitted encoder releases the GIL

    def __reduce__(self):  # pickle by value (for spawned workers); caches are rebuilt
        return Tokenizer, (self.vocab, self.merges, self.special_tokens)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def special_token_id(self, token: str) -> int:
        if token not in self._special_ids:
            raise ValueError(f"{token!r} is not a special token of this tokenizer (they are {self.special_tokens})")
        return self._special_ids[token]

    # ---- encoding -------------------------------------------------------------------------------------------

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        """int32 ids of UTF-8 bytes (the caller has checked they are UTF-8)."""
        bounds, found = segments(raw, self._specials)
        special_ids = np.full(len(bounds), -1, np.int64)
        special_ids[: len(found)] = [self._ids[s] for s in found]
        if not hasattr(self._local, "cache"):
            self._local.cache = new_cache()
        return encode_segments(
            np.frombuffer(raw, np.uint8), bounds, special_ids, char_classes(), self._byte_ids,
            self._rank_keys, self._rank_vals, self._left, self._right, self._new, self._local.cache,
        )  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(_utf8(text)).tolist()

    def encode_iterable(self, iterable: Iterable[str], flush_bytes: int = 1 << 16) -> Iterator[int]:
        """Lazily encode an iterable of strings (e.g. an open file) with the same ids as encode("".join(iterable)).

        Text is buffered until flush_bytes, then encoded up to the last safe cut (see pretokenize.py), so memory
        stays flat unless the text goes on for very long without a space or newline.
        """
        parts, size = [], 0
        for text in iterable:
            parts.append(_utf8(text))
            size += len(parts[-1])
            if size < flush_bytes:
                continue
            raw = b"".join(parts)
            target = max(self._max_special, len(raw) - flush_bytes // 4)
            cut = find_cut(raw, target, self._specials, self._max_special)
            if cut < 0:
                cut = find_cut(raw, self._max_special, self._specials, self._max_special)
            if cut > 0:
                yield from self.encode_bytes(raw[:cut]).tolist()
                raw = raw[cut:]
            parts, size = [raw], len(raw)
        yield from self.encode_bytes(b"".join(parts)).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (any iterable, a numpy array or a torch tensor); bytes that are not valid UTF-8 become U+FFFD."""
        table = self._decode_table
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # once: a generator can't be read twice
        try:
            # a negative id is sent past the end so it raises like any other out-of-range id
            return b"".join([table[i] if i >= 0 else table[len(table)] for i in ids]).decode("utf-8", "replace")
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= i < len(table))
            raise ValueError(f"cannot decode id {bad!r}: ids run from 0 to {len(table) - 1}") from None

    # ---- files ----------------------------------------------------------------------------------------------

    def save(self, out_dir, exclusive: bool = False) -> None:
        """Write our three files and Hugging Face's three (see the module docstring) into out_dir (created if
        needed), each atomically and never through a link; ``exclusive``: none may exist yet (FileExistsError, even
        when another writer creates one meanwhile)."""
        os.makedirs(out_dir, exist_ok=True)
        vocab = {bytes_to_text(self.vocab[i]): i for i in range(len(self.vocab))}
        merges = [f"{bytes_to_text(a)} {bytes_to_text(b)}" for a, b in self.merges]
        meta = {
            "format": FORMAT, "version": VERSION, "pattern": GPT2_PATTERN,
            "special_tokens": self.special_tokens, "vocab_size": len(self.vocab), "num_merges": len(self.merges),
        }  # fmt: skip
        files = {
            "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0),
            "merges.txt": "".join(f"{m}\n" for m in ["#version: 0.2", *merges]),
            META_FILE: json.dumps(meta, ensure_ascii=False, indent=2),
            "tokenizer.json": json.dumps(hf.tokenizer_json(vocab, merges, self._special_ids), ensure_ascii=False),
            "tokenizer_config.json": json.dumps(hf.tokenizer_config(self._special_ids), ensure_ascii=False, indent=2),
            "special_tokens_map.json": json.dumps(hf.special_tokens_map(self.special_tokens), ensure_ascii=False),
        }
        for name, text in files.items():
            write_atomic(os.path.join(out_dir, name), text, exclusive)

    @classmethod
    def from_files(cls, vocab_path, merges_path, special_tokens=None) -> "Tokenizer":
        """Load GPT-2-style vocab.json and merges.txt (ours or GPT-2's own; either may be gzipped, as *.gz)."""
        vocab_path, merges_path = check_input_path(vocab_path), check_input_path(merges_path)
        special_tokens = check_special_tokens(special_tokens)
        try:
            with _open_text(vocab_path) as f:
                entries = json.load(f, object_pairs_hook=list)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{vocab_path} is not a valid vocab.json: {e}") from None
        merges = []
        with _open_text(merges_path) as f:
            for n, line in enumerate(f, 1):
                if (n == 1 and line.startswith("#version")) or not line.strip():
                    continue
                parts = line.rstrip("\n").split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{merges_path} line {n}: expected 'left right', got {line.rstrip()!r}")
                merges.append((parts[0], parts[1]))
        return cls._from_text(entries, merges, special_tokens, vocab_path, f"{vocab_path} and {merges_path}")

    @classmethod
    def from_hf(cls, path) -> "Tokenizer":
        """Load a Hugging Face tokenizer.json of byte-level BPE with GPT-2's pre-tokenization (e.g. GPT-2's own)."""
        path = check_input_path(path)
        entries, merges, special_ids = hf.read_tokenizer_json(path)
        entries = [(t, i) for t, i in entries if i not in special_ids.values()]  # specials are kept as UTF-8 text
        specials = {i: s.encode("utf-8") for s, i in special_ids.items()}
        return cls._from_text(entries, merges, list(special_ids), path, path, specials)

    @classmethod
    def _from_text(cls, entries, merges, special_tokens, vocab_name, names, extra=None) -> "Tokenizer":
        """A Tokenizer from [(token text, id)] and [(left text, right text)] in GPT-2's byte alphabet."""
        if not isinstance(entries, list) or not all(isinstance(i, int) for _, i in entries):
            raise ValueError(f"{vocab_name} must be a JSON object mapping tokens to integer ids")
        vocab = dict(extra or {})
        for text, i in entries:
            if i in vocab:
                raise ValueError(f"{vocab_name}: id {i} appears twice")
            vocab[i] = text_to_bytes(text, vocab_name)
        merges = [(text_to_bytes(a, names), text_to_bytes(b, names)) for a, b in merges]
        try:
            return cls(vocab, merges, special_tokens)
        except ValueError as e:
            raise ValueError(f"{names} don't match: {e}") from None

    @classmethod
    def load(cls, tok_dir) -> "Tokenizer":
        """Load a directory written by save() (the CLI's --out): ours of version 2, or of version 1 (whose
        metadata file was named tokenizer.json), or only a Hugging Face tokenizer.json."""
        tok_dir = os.fspath(tok_dir)
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"no tokenizer directory at {tok_dir}")
        meta_path, version = os.path.join(tok_dir, META_FILE), VERSION
        if not os.path.exists(meta_path):
            meta_path, version = os.path.join(tok_dir, "tokenizer.json"), 1
            if not os.path.exists(os.path.join(tok_dir, "vocab.json")) and os.path.exists(meta_path):
                return cls.from_hf(meta_path)
        try:
            with open(check_input_path(meta_path), encoding="utf-8") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != version:
            raise ValueError(f"{meta_path}: expected format {FORMAT!r} version {version}")
        if meta.get("pattern") != GPT2_PATTERN:
            raise ValueError(f"{meta_path}: unsupported pre-tokenization pattern {meta.get('pattern')!r}")
        try:
            specials = check_special_tokens(meta.get("special_tokens"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{meta_path}: {e}") from None
        tok = cls.from_files(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), specials)
        if len(tok) != meta.get("vocab_size"):
            raise ValueError(f"{meta_path} says vocab_size {meta.get('vocab_size')}, but the files hold {len(tok)}")
        return tok


def _open_text(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text has a lone surrogate {text[e.start]!r} at index {e.start}, not encodable") from None
