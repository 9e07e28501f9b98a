"""Where training text comes from: corpora in the formats they ship in, read one document at a time.

A source (``smollm prepare --train``, ``smollm train --train-data``) is one of

- a file: ``.txt`` (UTF-8 text, documents separated by ``<|endoftext|>``), ``.jsonl`` or ``.jsonl.gz`` (one JSON
  object per line, the document in its ``text`` field), or ``.parquet`` (a ``text`` string column, read one row
  group at a time with pyarrow, the ``data`` extra: ``pip install 'smollm-stack[data]'``);
- a directory (its files of those kinds, sorted by path) or a glob pattern (``data/train-*.parquet``): shards;
- a Hugging Face Hub dataset, ``hf:REPO_ID[@REVISION]:PATTERN``, e.g. ``hf:HuggingFaceFW/fineweb-edu:sample/10BT/00*``:
  huggingface_hub downloads the files matching PATTERN into its cache (resumable, checksummed, reused; with
  ``HF_HUB_OFFLINE=1`` only the cache is read). The pattern picks the split, as the files are named by it.

Documents stream with bounded memory (a .txt in chunks cut before special tokens, a .jsonl line by line, a parquet
file row group by row group) as batches of about ``BATCH_BYTES`` of UTF-8, every document followed by
``<|endoftext|>``, ready for the tokenizer's parallel trainer and encoder. Bad data (invalid UTF-8, a missing or
non-string text field, a file with no documents) is a ValueError naming the file and its line or row group.
"""

import fnmatch
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import zlib
from pathlib import Path

EOT = "<|endoftext|>"
TEXT_FIELD = "text"
BATCH_BYTES = 4 << 20
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
HUB = "hf:"


def kind(path: Path) -> str | None:
    """The kind of file ``path`` names: "txt", "jsonl" or "parquet", None for another."""
    name = path.name.lower()
    return next((k for suffix, k in KINDS.items() if name.endswith(suffix)), None)


def is_text(sources: list[Path]) -> bool:
    """Whether ``sources`` is one text file, which is encoded to one ``.npy`` rather than to a shard directory."""
    return len(sources) == 1 and kind(sources[0]) not in ("jsonl", "parquet")


def resolve(spec) -> list[Path]:
    """The source files ``spec`` names (see the module docstring), in a fixed order."""
    spec = os.fspath(spec)
    if spec.startswith(HUB):
        files = hub_files(spec)
    elif os.path.isdir(spec):
        files = sorted(p for p in Path(spec).rglob("*") if p.is_file() and kind(p) and not p.name.startswith("."))
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        for path in files:
            if kind(path) is None:
                raise ValueError(f"{path} (matched by {spec}) is not .txt, .jsonl, .jsonl.gz or .parquet")
    elif os.path.isfile(spec):
        files = [Path(spec)]  # a single file of another name is read as text, as it always was
    else:
        raise FileNotFoundError(f"data file not found: {spec}")
    if not files:
        raise ValueError(f"{spec} holds no .txt, .jsonl, .jsonl.gz or .parquet files")
    parquet = next((p for p in files if kind(p) == "parquet"), None)
    if parquet and importlib.util.find_spec("pyarrow") is None:  # said before any work, not at the first such shard
        raise ValueError(f"{parquet} needs pyarrow to read parquet: pip install 'smollm-stack[data]'")
    return files


def hub_files(spec: str) -> list[Path]:
    """Download (or find in the cache) the files of ``hf:REPO_ID[@REVISION]:PATTERN``; their local paths."""
    repo, _, pattern = spec[len(HUB) :].partition(":")
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1 or not pattern:
        raise ValueError(f"{spec}: a Hub dataset is hf:OWNER/NAME[@REVISION]:PATTERN, e.g. hf:org/corpus:data/train-*")
    fetch = dict(repo_id=repo_id, repo_type="dataset", revision=revision or None, allow_patterns=[pattern])
    root = Path(hub_fetch("snapshot_download", spec, **fetch))
    # matched as huggingface_hub matches allow_patterns: fnmatch, where * also crosses a "/"
    files = sorted(p for p in root.rglob("*") if p.is_file() and fnmatch.fnmatch(str(p.relative_to(root)), pattern))
    if not files:
        raise ValueError(f"{spec}: no file of {repo_id} matches {pattern}")
    return files


def hub_fetch(function: str, what: str, **kwargs) -> str:
    """``huggingface_hub.<function>(**kwargs)``: a local path, or a ValueError naming ``what`` and why not."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f"{what} needs huggingface_hub: pip install 'smollm-stack[data]'") from None
    try:
        return getattr(huggingface_hub, function)(**kwargs)
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot fetch {what}: {reason}") from None


# ---- documents -> UTF-8 batches ---------------------------------------------------------------------------------


def text_batches(path: Path, field: str = TEXT_FIELD, batch_bytes: int = BATCH_BYTES):
    """The text of ``path`` as UTF-8 batches that each end right after an ``<|endoftext|>`` (or at the end)."""
    if kind(path) in ("jsonl", "parquet"):
        yield from _join(_jsonl(path, field) if kind(path) == "jsonl" else _parquet(path, field), path, batch_bytes)
        return
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: a shard needs at least one document")
    from smollm_stack.tokenizer.parallel import chunk_bounds, read_chunk  # (the tokenizer loads Numba: when used)

    for start, end in chunk_bounds(os.fspath(path), batch_bytes, [EOT]):
        yield read_chunk(os.fspath(path), start, end)  # names the byte offset of invalid UTF-8


def _join(docs, path: Path, batch_bytes: int):
    eot, parts, size, count = EOT.encode(), [], 0, 0
    for doc in docs:
        parts += (doc, eot)
        size += len(doc) + len(eot)
        count += 1
        if size >= batch_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    if count == 0:
        raise ValueError(f"{path} holds no documents: a shard needs at least one")
    if parts:
        yield b"".join(parts)


def _jsonl(path: Path, field: str):
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _json_text(line, field, f"{path} line {line_no}")
    except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated .gz
        raise ValueError(f"{path}: cannot read it ({e})") from None


def _json_text(line: bytes, field: str, where: str) -> bytes:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
    except ValueError as e:
        raise ValueError(f"{where} is not JSON: {e}") from None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{where} has no string field {field!r} (a JSON object with the document text is expected; "
                         "--text-field names another field)")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: field {field!r} holds an unpaired surrogate escape, not UTF-8 text") from None


def _parquet(path: Path, field: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path} needs pyarrow to read parquet: pip install 'smollm-stack[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file: {e}") from None
    schema = table.schema_arrow
    if field not in schema.names:
        raise ValueError(f"{path} has no column {field!r} (its columns: {', '.join(schema.names)}; "
                         "--text-field names another)")
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {field!r} is {column_type}, expected a string column of document text")
    for group in range(table.num_row_groups):
        where = f"{path} row group {group}"
        try:
            column = table.read_row_group(group, columns=[field]).column(0)
            column.validate(full=True)  # pyarrow trusts the file's strings to be UTF-8: check them
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{where}: {str(e).splitlines()[0]}") from None
        if column.null_count:
            raise ValueError(f"{where}: column {field!r} has {column.null_count} missing (null) documents")
        yield from column.cast(pa.large_binary()).to_pylist()


# ---- identity: the digests that key the cache and the shard manifests -------------------------------------------


def file_digest(path: Path, size: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:size]


def tokenizer_digest(tok_dir: Path) -> str:
    from smollm_stack.tokenizer.tokenizer import META_FILE

    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt", META_FILE):  # the special tokens are in the metadata
        if (tok_dir / name).is_file():
            h.update((tok_dir / name).read_bytes())
    return h.hexdigest()[:16]
