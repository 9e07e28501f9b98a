"""Sharded token files: one ``.npy`` of token ids per source file, and the ``manifest.json`` that makes them one corpus.

    OUT/train/manifest.json
    OUT/train/shard-00000.npy    the first source file's tokens (uint16 when the vocabulary fits, else uint32)
    OUT/train/shard-00001.npy    ...

The manifest records the tokenizer's digest and, per shard, its file, token count and size, and the source file it
was encoded from with that file's size and SHA-256. It is rewritten (atomically) after every shard with
``"complete": false``, and once more with ``true`` at the end. So the loader opens only a finished set; a rerun of
the same command skips the shards already written and goes on from there; and a source that changed since its shard
was written is an error naming it (``--force`` encodes everything again).

``ShardedTokens`` reads a finished set as one flat array (slices, int64 offsets): the samplers draw positions over
the whole corpus exactly as over a single ``.npy``, which is the one-shard case, so batches stay a pure function of
(seed, step) for any world size. A window may span two shards, as it may span two documents.
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from smollm_stack.files import make_dir, write_atomic
from smollm_stack.train.data.sources import TEXT_FIELD, file_digest, kind, text_batches, tokenizer_digest

MANIFEST = "manifest.json"
FORMAT, VERSION = "smollm-token-shards", 1


def read_manifest(out: Path) -> dict | None:
    """The manifest of the shard directory ``out``, None if it has none; an error if it is not one of ours."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable shard manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a shard manifest of ours (format {FORMAT}): choose another output")
    for shard in manifest.get("shards", []):  # only our own shard names, inside this directory
        if not re.fullmatch(r"shard-\d{5}\.npy", str(shard.get("file"))):
            raise ValueError(f"{path} names a shard {shard.get('file')!r}: not a shard manifest of ours")
    return manifest


def write_shards(sources: list[Path], tok_dir: Path, out: Path, force=False, progress=True, field=TEXT_FIELD) -> Path:
    """Encode each source file (documents in ``field`` of jsonl and parquet) into ``out/shard-NNNNN.npy`` with the
    tokenizer in ``tok_dir``; return ``out``.

    Resumes a half-finished set made with the same tokenizer and field, keeping every shard whose source is
    unchanged; a changed source, tokenizer or field is an error (before anything is written) unless ``force``,
    which encodes everything again. Until the set is complete the manifest also lists the old shards not yet
    replaced, so a stopped run forgets nothing it could keep, and the last write removes those the new set does not
    have.
    """
    from smollm_stack.tokenizer import Tokenizer
    from smollm_stack.tokenizer.file_encoder import token_dtype

    digest = tokenizer_digest(tok_dir)
    make_dir(out, exist_ok=True)
    old = read_manifest(out) or {}  # (refuses a manifest.json that is not ours, even with force)
    kept = {} if force else _reusable(old, out, digest, field)
    records = [_source_record(i, source, kept, out) for i, source in enumerate(sources)]
    tokenizer = Tokenizer.load(tok_dir)
    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": digest, "dtype": token_dtype(tokenizer).__name__,
                "text_field": field}
    done = []

    def save(complete: bool):
        files = {s["file"] for s in done}
        rest = [] if complete else [s for s in old.get("shards", []) if s["file"] not in files]
        write_atomic(out / MANIFEST, json.dumps({**manifest, "complete": complete, "shards": done + rest}, indent=1))

    save(complete=False)  # marks the directory ours, and unfinished
    for record in records:
        shard = kept.get(record["source"])
        if shard is None or shard["file"] != record["file"]:
            ids = _encode_shard(Path(record["source"]), tokenizer, out / record["file"], progress, field)
            shard = {"tokens": len(ids), "bytes": (out / record["file"]).stat().st_size}
        done.append({**record, "tokens": shard["tokens"], "bytes": shard["bytes"]})
        save(complete=False)
    save(complete=True)
    files = {s["file"] for s in done}
    for shard in old.get("shards", []):  # shards of ours that a forced rerun no longer has
        if shard["file"] not in files and is_npy(out / shard["file"]):
            (out / shard["file"]).unlink()
    return out


def _source_record(index: int, source: Path, kept: dict, out: Path) -> dict:
    """A shard's manifest entry but its token count and size; an error if its source changed since it was kept."""
    record = {"file": f"shard-{index:05d}.npy", "source": str(source), "source_bytes": os.path.getsize(source)}
    record["source_sha256"] = file_digest(source, size=64)
    old = kept.get(str(source))
    if old is not None and old["source_sha256"] != record["source_sha256"]:
        raise ValueError(
            f"{source} changed since it was encoded into {out / old['file']}: "
            "rerun with --force to encode everything again (or restore the file)"
        )
    return record


def _reusable(manifest: dict, out: Path, digest: str, field: str) -> dict[str, dict]:
    """{source path: shard record} of the shards in ``out`` that are still there, whole, for the same tokenizer."""
    if not manifest.get("shards"):  # (nothing encoded yet: nothing to keep, nothing to contradict)
        return {}
    if manifest.get("text_field", TEXT_FIELD) != field:
        raise ValueError(
            f"{out} was encoded from the field {manifest.get('text_field', TEXT_FIELD)!r}, not {field!r}: "
            "choose another output, or --force to encode everything again"
        )
    if manifest.get("tokenizer") != digest:
        raise ValueError(
            f"{out} was encoded with another tokenizer ({manifest.get('tokenizer')}, this one is {digest}): "
            "choose another output, or --force to encode everything again"
        )
    shards = manifest.get("shards", [])
    return {s["source"]: s for s in shards if _whole(out / s["file"], s["bytes"])}


def _whole(path: Path, size: int) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == size


def _encode_shard(source: Path, tokenizer, shard: Path, progress: bool, field: str):
    from smollm_stack.tokenizer import encode_batches, encode_file

    replace = shard.exists()  # a shard of a killed run, written before its manifest entry
    if replace and not is_npy(shard):
        raise ValueError(f"{shard} is not a .npy file of ours: --force does not replace it (move it away)")
    print(f"encoding {source} -> {shard}")
    if kind(source) in ("jsonl", "parquet"):
        batches = text_batches(source, field)
        return encode_batches(batches, tokenizer, shard, progress=progress, replace=replace, size=None)
    if os.path.getsize(source) == 0:
        raise ValueError(f"{source} is empty: a shard needs at least one document")
    return encode_file(source, tokenizer, shard, progress=progress, replace=replace)


def is_tokens(spec) -> bool:
    """Whether ``spec`` names tokens already: a ``.npy`` file or a shard directory (see shards.py)."""
    path = Path(spec)
    return (path.suffix == ".npy" and path.is_file()) or (path / MANIFEST).is_file()


def is_npy(path: Path) -> bool:
    """Whether ``path`` is a plain file that starts like a .npy (what we may replace)."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


# ---- reading ----------------------------------------------------------------------------------------------------


def open_shards(out: Path, check) -> "ShardedTokens":
    """A finished shard set, each shard opened memory-mapped and passed through ``check(array, path)``."""
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out} has no {MANIFEST}: not a shard directory")
    if not manifest.get("complete"):
        raise ValueError(
            f"{out} is a half-finished prepare ({len(manifest.get('shards', []))} shards written): "
            "run the same command again to finish it"
        )
    arrays = []
    for shard in manifest["shards"]:
        path = out / shard["file"]
        data = check(path)
        if len(data) != shard["tokens"]:
            raise ValueError(f"{path} has {len(data)} tokens but {out / MANIFEST} says {shard['tokens']}")
        arrays.append(data)
    return ShardedTokens(arrays)


class ShardedTokens:
    """Shards read end to end as one flat 1-D token array: ``len`` and slices (each a numpy array)."""

    ndim = 1

    def __init__(self, shards: list[np.ndarray]):
        if not shards:
            raise ValueError("a shard set needs at least one shard")
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards], dtype=np.int64)  # past 2**31 tokens too
        self.dtype = np.result_type(*(s.dtype for s in shards))
        self.shape = (int(self.offsets[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[key : key + 1][0] if key >= 0 else self[len(self) + key]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports integers and contiguous slices")
        start, stop, _ = key.indices(len(self))
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            end = min(stop, int(self.offsets[k + 1]))
            parts.append(self.shards[k][start - self.offsets[k] : end - self.offsets[k]])
            start, k = end, k + 1
        if not parts:
            return np.empty(0, self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
