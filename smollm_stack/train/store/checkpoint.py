"""Checkpoints: plain dicts written atomically with a checksum beside them, read back with ``weights_only=True``.

A checkpoint holds everything a resumed run needs to continue as if never stopped:
``{"model", "model_config", "optimizer", "iteration", "train_config", "rng", "sampler", "elapsed_s"}``.
RNG states are stored as tensors and lists (never pickled objects), so ``torch.load(weights_only=True)`` reads them.
``X.pt.sha256`` holds the SHA-256 of ``X.pt``: a file damaged after its write (a flipped bit, a truncating copy)
fails it and is reported as damaged instead of training on from garbage. A checkpoint without one (written before
checksums existed, or copied alone) is read unverified. Where the checkpoints of a run live is train.store.rundir's.
"""

import hashlib
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import IO

import numpy as np
import torch

from smollm_stack.files import WriteError, atomic_file, write_atomic
from smollm_stack.model import clean_state_dict

REQUIRED_KEYS = ("model", "optimizer", "iteration")


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile and DDP wrappers (either may wrap the other)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def rng_state() -> dict:
    """The torch, CUDA, numpy and Python RNG states, as types weights_only loading accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    out: str | os.PathLike | IO[bytes],
    exclusive: bool = False,
    **extra,
):
    """Write model, optimizer, iteration, RNG states and any ``extra`` entries to a path or a binary file object.

    A path is written atomically (smollm_stack.files: a temporary file in the same directory, flushed to disk, its
    checksum written beside it, then renamed over the target, never through a link), so a crash mid-save leaves the
    previous file intact and never a truncated one; ``exclusive`` refuses an existing target. A failed write (a full
    disk) is a ValueError naming the file; nothing is left behind.
    """
    checkpoint = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "rng": rng_state(),
        **extra,
    }
    if not isinstance(out, (str, os.PathLike)):
        torch.save(checkpoint, out)
        return
    out = Path(out)
    try:
        with atomic_file(out, exclusive) as f:
            torch.save(checkpoint, f)
            f.flush()
            f.seek(0)
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            write_atomic(checksum_path(out), f"{digest}  {out.name}\n")  # before the rename: never unverifiable
    except (RuntimeError, WriteError) as e:  # torch says "enforce fail at inline_container.cc" for a full disk
        free = shutil.disk_usage(out.parent).free / 2**20
        reason = e.reason if isinstance(e, WriteError) else str(e).splitlines()[-1].strip()
        raise ValueError(
            f"cannot write checkpoint {out} ({free:.0f} MiB free on its disk): {reason}; "
            "the previous checkpoint is intact"
        ) from None


def verify(path: str | os.PathLike):
    """Raise unless ``path`` is a file whose SHA-256 matches its ``.sha256`` sidecar (when it has one)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    checksum = checksum_path(Path(path))
    if checksum.is_file() and checksum.read_text(errors="replace").split()[:1] != [sha256_file(path)]:
        raise ValueError(f"{path} is damaged: its SHA-256 differs from the one saved with it in {checksum.name}")


def read_checkpoint(src: str | os.PathLike | IO[bytes], map_location="cpu") -> dict:
    """The checkpoint dict, its checksum verified when it has one, loaded with weights_only=True (no code runs).

    Anything that is not an intact checkpoint (damaged, truncated, empty, another kind of file, a pickle with code
    in it) is a ValueError naming the file.
    """
    if isinstance(src, (str, os.PathLike)):
        verify(src)
    try:
        checkpoint = torch.load(src, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{src} is not a training checkpoint: it holds objects other than tensors") from None
    except Exception as e:  # KeyError, EOFError, RuntimeError, ...: whatever torch.load meets in a foreign file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{src} is not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or not set(REQUIRED_KEYS) <= checkpoint.keys():
        raise ValueError(f"{src} is not a training checkpoint (needs {', '.join(map(repr, REQUIRED_KEYS))})")
    return checkpoint


def apply_checkpoint(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a checkpoint dict's weights (torch.compile / DDP prefixes stripped) and optimizer state; the iteration."""
    unwrap(model).load_state_dict(clean_state_dict(checkpoint["model"]))
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint["iteration"]


def load_checkpoint(
    src: str | os.PathLike | IO[bytes], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Restore model and optimizer from a checkpoint path or file object; return the iteration it was saved at."""
    device = next(model.parameters()).device
    return apply_checkpoint(read_checkpoint(src, map_location=device), model, optimizer)
