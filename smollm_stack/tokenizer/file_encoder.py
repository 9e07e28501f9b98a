"""Parallel, streaming encoding of a text file into a flat .npy of token ids.

The file is cut into ~4 MB chunks at safe positions (parallel.py), workers encode chunks independently, and the
main process appends their ids to the .npy in file order with a bounded number of chunks in flight, so memory stays
flat for a file larger than RAM. The .npy header is written with room to spare and patched with the final length.
All of it goes to a temporary file beside the output, renamed over it only when complete: a failed or killed encode
leaves the output as it was (absent, or the previous good file), never an empty or partial array.
"""

import os

import numpy as np
from tqdm.auto import tqdm

from smollm_stack.files import atomic_file
from smollm_stack.tokenizer.inputs import check_input_path
from smollm_stack.tokenizer.parallel import chunk_bounds, ordered_map, process_pool, read_chunk, trim_heap
from smollm_stack.tokenizer.pretokenize import char_classes
from smollm_stack.tokenizer.tokenizer import Tokenizer

CHUNK_BYTES = 4 << 20
HEADER_BYTES = 128  # fixed-size .npy v1 header, so it can be rewritten in place once the length is known

_worker_tokenizer: Tokenizer | None = None


def _set_tokenizer(tokenizer):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_range(args):
    path, start, end, dtype = args
    return _encode_batch((read_chunk(path, start, end), dtype))


def _encode_batch(args):
    raw, dtype = args
    ids = _worker_tokenizer.encode_bytes(raw).astype(dtype)
    trim_heap()  # (the chunk's buffers are freed by now; the ids stay)
    return ids, len(raw)


def _npy_header(dtype, length: int) -> bytes:
    header = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (length,)}).encode("latin1")
    pad = HEADER_BYTES - 10 - len(header) - 1
    return b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little") + header + b" " * pad + b"\n"


def token_dtype(tokenizer: Tokenizer):
    """uint16 when every id fits, else uint32."""
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def encode_file(
    input_path, tokenizer: Tokenizer, out_path, num_workers=None, progress=True, replace=False
) -> np.memmap:
    """Encode a UTF-8 text file to a flat .npy (uint16 if the vocabulary fits, else uint32); return it memory-mapped.

    The ids are identical to tokenizer.encode(whole file) for any number of workers. The output is created
    exclusively (FileExistsError if it exists, even when another encode creates it meanwhile) unless ``replace``;
    it is written through smollm_stack.files (never through a link; a killed encode's temporary file is removed by
    the next writer of the same name).
    """
    path = check_input_path(input_path)
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and os.path.samefile(path, out_path):
        raise ValueError(f"the output {out_path} is the input file: encoding would destroy it")
    dtype = token_dtype(tokenizer)
    tasks = [(path, s, e, dtype) for s, e in chunk_bounds(path, CHUNK_BYTES, tokenizer.special_tokens)]
    return _encode_to(out_path, _encode_range, tasks, tokenizer, num_workers, os.path.getsize(path), progress, replace)


def encode_batches(
    batches, tokenizer: Tokenizer, out_path, num_workers=None, progress=True, replace=False, size=None
) -> np.memmap:
    """encode_file for text that arrives as an iterable of UTF-8 ``bytes`` batches (documents streamed from jsonl or
    parquet), each ending right after a special token (or at the end): the ids equal those of the concatenation.

    At most two batches per worker are in memory at once; ``size`` is the total bytes, for the progress bar.
    """
    out_path = os.fspath(out_path)
    dtype = token_dtype(tokenizer)
    tasks = ((raw, dtype) for raw in batches)
    return _encode_to(out_path, _encode_batch, tasks, tokenizer, num_workers, size, progress, replace)


def _encode_to(out_path: str, fn, tasks, tokenizer: Tokenizer, num_workers, size, progress: bool, replace: bool):
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"{out_path} is a directory, expected a .npy file name")
    num_workers = num_workers or os.cpu_count() or 1
    char_classes()  # built here once, inherited by forked workers
    _set_tokenizer(tokenizer)
    tokenizer.encode("warm up the jit before forking")
    dtype = token_dtype(tokenizer)
    with atomic_file(out_path, exclusive=not replace) as out:
        _write_npy(out, fn, tasks, dtype, num_workers, size, progress)
    return np.load(out_path, mmap_mode="r")


def _write_npy(out, fn, tasks, dtype, num_workers: int, size, progress: bool):
    """Write fn(task) = (ids, input bytes) for each task, in order, into the open binary file ``out`` as a .npy."""
    total = 0
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="encode", disable=not progress)
    if isinstance(tasks, list):
        num_workers = min(num_workers, len(tasks))
    with bar, process_pool(num_workers) as pool:
        out.write(_npy_header(dtype, 0))
        for ids, nbytes in ordered_map(pool, fn, tasks, 2 * num_workers):
            out.write(ids.tobytes())
            total += len(ids)
            bar.update(nbytes)
        out.seek(0)
        out.write(_npy_header(dtype, total))
        out.seek(0, os.SEEK_END)
