"""Parallel, streaming encoding of a text file into a flat .npy of token ids.

The file is cut into ~4 MB chunks at safe positions (parallel.py), workers encode chunks independently, and the
main process appends their ids to the .npy in file order with a bounded number of chunks in flight, so memory stays
flat for a file larger than RAM. The .npy header is written with room to spare and patched with the final length.
All of it goes to a temporary file beside the output, renamed over it only when complete: a failed or killed encode
leaves the output as it was (absent, or the previous good file), never an empty or partial array.
"""

import collections
import os

import numpy as np
from tqdm.auto import tqdm

from smollm_stack.files import atomic_file
from smollm_stack.tokenizer.inputs import check_input_path
from smollm_stack.tokenizer.parallel import chunk_bounds, process_pool, read_chunk
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
    return _worker_tokenizer.encode_bytes(read_chunk(path, start, end)).astype(dtype), end - start


def _npy_header(dtype, length: int) -> bytes:
    header = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (length,)}).encode("latin1")
    pad = HEADER_BYTES - 10 - len(header) - 1
    return b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little") + header + b" " * pad + b"\n"


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
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"{out_path} is a directory, expected a .npy file name")
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    num_workers = num_workers or os.cpu_count() or 1
    tasks = [(path, s, e, dtype) for s, e in chunk_bounds(path, CHUNK_BYTES, tokenizer.special_tokens)]
    char_classes()  # built here once, inherited by forked workers
    _set_tokenizer(tokenizer)
    tokenizer.encode("warm up the jit before forking")
    with atomic_file(out_path, exclusive=not replace) as out:
        _write_npy(out, tasks, dtype, num_workers, os.path.getsize(path), progress)
    return np.load(out_path, mmap_mode="r")


def _write_npy(out, tasks: list, dtype, num_workers: int, size: int, progress: bool):
    """Encode ``tasks`` in order into the open binary file ``out`` as a .npy (``size``: input bytes, for the bar)."""
    total = 0
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="encode", disable=not progress)
    with bar, process_pool(min(num_workers, len(tasks))) as pool:
        out.write(_npy_header(dtype, 0))

        def write(ids, nbytes):
            nonlocal total
            out.write(ids.tobytes())
            total += len(ids)
            bar.update(nbytes)

        if pool is None:
            for task in tasks:
                write(*_encode_range(task))
        else:
            in_flight = collections.deque()
            for task in tasks:
                in_flight.append(pool.apply_async(_encode_range, (task,)))
                if len(in_flight) >= 2 * num_workers:
                    write(*in_flight.popleft().get())
            while in_flight:
                write(*in_flight.popleft().get())
        out.seek(0)
        out.write(_npy_header(dtype, total))
        out.seek(0, os.SEEK_END)
