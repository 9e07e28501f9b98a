"""Checkpoints: plain dicts written atomically, read back with ``weights_only=True``.

A checkpoint holds everything a resumed run needs to continue as if never stopped:
``{"model", "model_config", "optimizer", "iteration", "train_config", "rng", "sampler", "elapsed_s"}``.
RNG states are stored as tensors and lists (never pickled objects), so ``torch.load(weights_only=True)`` reads them.
"""

import os
import random
import tempfile
from pathlib import Path
from typing import IO

import numpy as np
import torch

from model import clean_state_dict

CKPT_GLOB = "ckpt_*.pt"


def ckpt_name(iteration: int) -> str:
    return f"ckpt_{iteration:06d}.pt"


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
    **extra,
):
    """Write model, optimizer, iteration, RNG states and any ``extra`` entries to a path or a binary file object.

    A path is written atomically: to a temporary file in the same directory, flushed to disk, then renamed over the
    target, so a crash mid-save leaves the previous file intact and never a truncated one.
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
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(src: str | os.PathLike | IO[bytes], map_location="cpu") -> dict:
    """The checkpoint dict, loaded with weights_only=True (no arbitrary code runs while reading)."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise FileNotFoundError(f"no checkpoint file at {src}")
    checkpoint = torch.load(src, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "iteration"} <= checkpoint.keys():
        raise ValueError(f"{src} is not a training checkpoint (needs 'model', 'optimizer' and 'iteration')")
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


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first (names carry the zero-padded iteration)."""
    return sorted(Path(run_dir).glob(CKPT_GLOB))


def prune_checkpoints(run_dir: str | os.PathLike, keep: int):
    for path in list_checkpoints(run_dir)[:-keep]:
        path.unlink()
