"""Token data for training: opening and checking token arrays, sampling batches, and turning text into tokens.

Token arrays are flat 1-D ``.npy`` files, opened as ``np.memmap`` so a corpus larger than memory costs nothing
to open, or shard directories of them (shards.py) read as one array. Text is tokenized once and cached under
``$SMOLLM_CACHE`` (default ``~/.cache/smollm-stack``): the BPE tokenizer under ``tok-<sha of the training
text>-v<vocab>`` and each encoded file as ``<sha of the text>-<sha of the tokenizer>.npy`` (other sources as a
``shards-<sha of the sources>-<sha of the tokenizer>`` directory), so a second run (or another rank) starts at once.
"""

import hashlib
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from smollm_stack.files import atomic_dir
from smollm_stack.train.data.shards import is_tokens, open_shards, read_manifest, write_shards
from smollm_stack.train.data.sources import (
    EOT,
    TEXT_FIELD,
    file_digest,
    is_text,
    resolve,
    text_batches,
    tokenizer_digest,
)


# ---- opening token arrays ---------------------------------------------------------------------------------------


def open_tokens(path: str | os.PathLike, vocab_size: int | None = None):
    """Open a 1-D integer ``.npy`` token file memory-mapped, or a shard directory (shards.py) as one flat array,
    checking every id against ``vocab_size``.

    The check reads the file once in chunks, so a token id the model has no embedding for (negative, or past the
    vocabulary) fails here with the file's name instead of as a device-side assert deep in the first forward pass.
    """
    path = Path(path)
    if path.is_dir():
        return open_shards(path, lambda shard: open_tokens(shard, vocab_size))
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    try:
        data = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ValueError(f"{path} is not a readable .npy token array: {e}") from None
    if data.ndim != 1 or not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer token array, got shape {data.shape} of {data.dtype}")
    if vocab_size is not None:
        chunk = 1 << 24
        spans = [(int(data[i : i + chunk].min()), int(data[i : i + chunk].max())) for i in range(0, len(data), chunk)]
        low, top = min((lo for lo, _ in spans), default=0), max((hi for _, hi in spans), default=-1)
        if low < 0:
            raise ValueError(f"{path} holds a negative token id ({low}): it is not a token array of this project")
        if top >= vocab_size:
            raise ValueError(
                f"{path} holds token id {top} but the vocabulary has {vocab_size} ids: "
                "the data was encoded with a different tokenizer (or pass a larger --vocab-size)"
            )
    return data


# ---- batches ----------------------------------------------------------------------------------------------------


def batch_from_starts(data: np.ndarray, starts, context_length: int, device: torch.device | str):
    """Inputs ``data[s : s + T]`` and targets ``data[s + 1 : s + T + 1]`` for each start s, int64 on ``device``.

    On CUDA the host tensors are pinned and copied asynchronously, so the copy overlaps the previous step.
    """
    rows = np.stack([np.asarray(data[s : s + context_length + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)
    device = torch.device(device)
    if device.type == "cuda":
        rows = rows.pin_memory().to(device, non_blocking=True)
    else:
        rows = rows.to(device)
    return rows[:, :-1], rows[:, 1:]


def get_batch(data: np.ndarray, batch_size: int, context_length: int, device: torch.device | str):
    """A random batch (x, y) of shape (batch_size, context_length): starts uniform over every valid position.

    Draws from torch's global RNG; the trainer uses ``BatchSampler`` instead, whose batches depend only on
    (seed, step) so that resumes and multi-process runs see exactly the same tokens.
    """
    check_length(data, context_length, "data")
    starts = torch.randint(0, len(data) - context_length, (batch_size,)).tolist()
    return batch_from_starts(data, starts, context_length, device)


def check_length(data: np.ndarray, context_length: int, name: str):
    if len(data) <= context_length:
        raise ValueError(
            f"the {name} has {len(data)} tokens, too few for one sequence of context_length {context_length} "
            "(+1 for the shifted targets): use more data or a shorter --context-length"
        )


class BatchSampler:
    """Training batches as a pure function of (seed, step): nothing to checkpoint but the seed and the step.

    Step ``s`` draws one global batch of ``batch_size * grad_accum * world_size`` starts from a generator seeded by
    (seed, s); micro-batch ``m`` of rank ``r`` is slice ``r * grad_accum + m`` of it. Each rank thus reads its own
    stream of sequences, and the union over ranks is the same global batch a single process with the same global
    batch would draw, which is what makes multi-process runs and resumed runs reproduce a single uninterrupted one.
    """

    def __init__(self, data: np.ndarray, batch_size: int, context_length: int, seed: int, slots: int):
        check_length(data, context_length, "training data")
        self.data, self.batch_size, self.context_length = data, batch_size, context_length
        self.seed, self.slots = seed, slots

    def starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.data) - self.context_length, size=self.slots * self.batch_size)

    def batch(self, step: int, slot: int, device: torch.device | str):
        starts = self.starts(step)[slot * self.batch_size : (slot + 1) * self.batch_size]
        return batch_from_starts(self.data, starts, self.context_length, device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "slots": self.slots, "batch_size": self.batch_size}


class AlignedBatchSampler(BatchSampler):
    """``--windows aligned``: training windows that start at document starts, drawn like BatchSampler's.

    A window's input starts on the ``<|endoftext|>`` that ends the previous document (at position 0 for the first
    document), so its first target is the document's first token and the separator serves as the beginning-of-
    sequence token. The window then runs on through the following documents: several short documents pack into it
    in corpus order, and the last one is cut where the window ends (simpler than best-fit packing, and no token
    is dropped from the stream). A document longer than a window is split into pieces: starts every
    ``context_length`` tokens, so the pieces' targets tile the whole document.

    Starts are drawn as BatchSampler draws them, a position uniform over the corpus from a generator seeded by
    (seed, step), then moved back to the start of its document piece: a piece is drawn in proportion to its length
    (long documents are not under-sampled), and batches stay a pure function of (seed, step), so resumes and
    multi-process runs reproduce a single uninterrupted run.
    """

    def __init__(self, data: np.ndarray, batch_size: int, context_length: int, seed: int, slots: int, eot_id: int):
        super().__init__(data, batch_size, context_length, seed, slots)
        self.eot_id = eot_id
        self.piece_starts = piece_starts(data, eot_id, context_length)

    def starts(self, step: int) -> np.ndarray:
        drawn = super().starts(step)
        return self.piece_starts[np.searchsorted(self.piece_starts, drawn, side="right") - 1]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "windows": "aligned", "eot_id": self.eot_id}


def piece_starts(data: np.ndarray, eot_id: int, context_length: int) -> np.ndarray:
    """Sorted window starts: 0, each <|endoftext|>, and every context_length tokens into a longer document.

    Only starts that leave room for a whole window (``context_length`` + 1 tokens) are kept; 0 always is.
    """
    chunk = 1 << 24
    eots = [i + np.flatnonzero(np.asarray(data[i : i + chunk]) == eot_id) for i in range(0, len(data), chunk)]
    bounds = np.unique(np.concatenate([[0], *eots, [len(data)]]).astype(np.int64))
    lengths = np.diff(bounds)  # a document's span: its opening separator up to the next one
    pieces = -(-lengths // context_length)  # ceil
    first = np.repeat(bounds[:-1], pieces)
    offset = np.arange(len(first)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # 0, 1, ... within a document
    starts = first + offset * context_length
    return starts[starts <= len(data) - context_length - 1]


def batch_sampler(windows: str, data, batch_size: int, context_length: int, seed: int, slots: int, eot_id):
    """The training sampler of ``--windows``: "uniform" (BatchSampler) or "aligned" (needs the separator's id)."""
    if windows == "uniform":
        return BatchSampler(data, batch_size, context_length, seed, slots)
    if eot_id is None:
        raise ValueError(
            f"--windows aligned needs to know where documents end: a tokenizer with {EOT} "
            "(with .npy data, pass the --tokenizer it was encoded with)"
        )
    return AlignedBatchSampler(data, batch_size, context_length, seed, slots, eot_id)


def document_ids(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """``--doc-mask``: (B, T) int32 document numbers of a batch of input windows, for the model's ``doc_ids``.

    Each ``<|endoftext|>`` opens a new document: it serves as that document's beginning-of-sequence token, as in
    AlignedBatchSampler's windows, so its target (the document's first token) is predicted from it alone, and every
    token of the document still sees it. The tokens before the first separator are the end of an earlier document.
    One cumsum on the device, no host sync.
    """
    return torch.cumsum(x == eot_id, dim=1, dtype=torch.int32)


def eval_starts(num_tokens: int, context_length: int, num_windows: int) -> np.ndarray:
    """Starts of the fixed validation windows: ``num_windows`` spread evenly over the split, or (0) all of it.

    With num_windows=0 the windows tile the split without overlap, so the loss covers every token once.
    """
    last = num_tokens - context_length - 1  # the last valid start
    tiling = np.arange(0, last + 1, context_length)
    if num_windows == 0 or num_windows >= len(tiling):
        return tiling
    return np.linspace(0, last, num_windows).round().astype(np.int64)


# ---- text -> tokens, cached -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smollm-stack"
    return Path(os.environ.get("SMOLLM_CACHE", default))


def default_corpus() -> tuple[Path, Path]:
    """The embedded TinyStories excerpt (train, valid) shipped in ``train/data/embedded`` (see its LICENSE.md)."""
    root = resources.files("smollm_stack.train.data") / "embedded"
    return Path(str(root / "train.txt")), Path(str(root / "valid.txt"))


def train_tokenizer(
    sources: list[Path],
    vocab_size: int,
    out_dir: Path,
    progress: bool = True,
    replace: bool = False,
    field: str = TEXT_FIELD,
):
    """Train a byte-level BPE tokenizer of ``vocab_size`` (``<|endoftext|>`` included) on the source files (see
    sources.py; documents in the ``field`` of jsonl and parquet) and save it to ``out_dir``."""
    from smollm_stack.tokenizer import Tokenizer, train_bpe, train_bpe_batches

    more = f" and {len(sources) - 1} more" if len(sources) > 1 else ""
    print(f"training a {vocab_size}-token BPE tokenizer on {sources[0]}{more} -> {out_dir}")
    if is_text(sources):
        vocab, merges = train_bpe(sources[0], vocab_size, [EOT], progress=progress)  # workers read the file
    else:
        batches = (batch for source in sources for batch in text_batches(source, field))
        vocab, merges = train_bpe_batches(batches, vocab_size, [EOT], progress=progress)
    atomic_dir(Path(out_dir), Tokenizer(vocab, merges, [EOT]).save, replace)


def encode_text(text: Path, tok_dir: Path, out: Path, progress: bool = True, replace: bool = False):
    """Encode a text file with the tokenizer saved in ``tok_dir`` to a flat ``.npy`` (encode_file writes atomically,
    exclusively unless ``replace``)."""
    from smollm_stack.tokenizer import Tokenizer, encode_file

    print(f"encoding {text} -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    encode_file(text, Tokenizer.load(tok_dir), out, progress=progress, replace=replace)


def sources_digest(sources: list[Path]) -> str:
    """The cache key of a list of source files: their contents, in order (one file: that file's digest)."""
    if len(sources) == 1:
        return file_digest(sources[0])
    return hashlib.sha256(" ".join(file_digest(p) for p in sources).encode()).hexdigest()[:16]


def cached_tokenizer(sources: list[Path], vocab_size: int, progress: bool = True, field: str = TEXT_FIELD) -> Path:
    out = cache_dir() / f"tok-{sources_digest(sources)}-v{vocab_size}{_field_key(sources, field)}"
    if not (out / "vocab.json").is_file():
        train_tokenizer(sources, vocab_size, out, progress, field=field)
    return out


def _field_key(sources: list[Path], field: str) -> str:
    """The cache key's part for the text field: none where it is the default or the sources are plain text."""
    return "" if field == TEXT_FIELD or is_text(sources) else f"-f{hashlib.sha256(field.encode()).hexdigest()[:8]}"


def cached_encoding(text: Path, tok_dir: Path, progress: bool = True) -> Path:
    out = cache_dir() / f"{file_digest(text)}-{tokenizer_digest(tok_dir)}.npy"
    if not out.is_file():
        try:
            encode_text(text, tok_dir, out, progress)
        except FileExistsError:
            pass  # another process finished it first: the same ids
    return out


def cached_tokens(sources: list[Path], tok_dir: Path, progress: bool = True, field: str = TEXT_FIELD) -> Path:
    """The encoded sources, cached: a single text file as a .npy, anything else as a shard directory."""
    if is_text(sources):
        return cached_encoding(sources[0], tok_dir, progress)
    out = cache_dir() / f"shards-{sources_digest(sources)}-{tokenizer_digest(tok_dir)}{_field_key(sources, field)}"
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None or not manifest.get("complete"):
        write_shards(sources, tok_dir, out, progress=progress, field=field)  # resumes a half-finished one
    return out


def resolve_data(train_data, val_data, tokenizer, vocab_size: int, progress: bool = True, field: str = TEXT_FIELD):
    """Paths of the (train tokens, val tokens, tokenizer dir or None) that a run reads, preparing what is missing.

    Each split is tokens already (a ``.npy``, or a shard directory: shards.py) or a source (sources.py: text,
    jsonl, parquet, a directory or glob of shards, a Hub dataset; documents in ``field``), encoded with
    ``tokenizer``, which is trained on the training source when not given. With no data at all, the embedded
    TinyStories corpus is used.
    """
    if train_data is None and val_data is None:
        train_data, val_data = default_corpus()
    if train_data is None or val_data is None:
        raise ValueError("give both --train-data and --val-data (or neither, for the embedded corpus)")
    specs = [spec if is_tokens(spec) else resolve(spec) for spec in (train_data, val_data)]
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    if tok_dir is not None and not (tok_dir / "vocab.json").is_file():
        raise FileNotFoundError(f"tokenizer dir {tok_dir} has no vocab.json (write one with Tokenizer.save)")
    if tok_dir is None and not isinstance(specs[0], list):
        if isinstance(specs[1], list):
            raise ValueError("text validation data with .npy training data needs --tokenizer")
        return Path(specs[0]), Path(specs[1]), None
    if tok_dir is None:
        tok_dir = cached_tokenizer(specs[0], vocab_size, progress, field)
    encoded = [cached_tokens(s, tok_dir, progress, field) if isinstance(s, list) else Path(s) for s in specs]
    return encoded[0], encoded[1], tok_dir
