"""The trainer: ``smollm train`` (``train.config`` has every option, ``train.cli`` the flags) and its rooms: ``store/``,
``optim/``, ``parallel/``, ``data/``."""

import os

# On a busy CPU, OpenMP threads that spin at barriers while a sibling is descheduled slow torch down 5-10x (2 cores,
# 2 threads, tiny preset: 4,000 -> 500 tokens/s); sleeping instead costs nothing we could measure. It must be set
# before torch loads OpenMP, hence here, first; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib

# name -> its module, imported on first use (PEP 562): `smollm lm sample` needs none of the trainer's machinery
# (FSDP, distributed checkpoints: ~2 s of imports), and `from smollm_stack.train import run` works as before.
_EXPORTS = {
    "AdamW": "optim.adamw",
    "TrainConfig": "config",
    "clip_grad_norm": "optim.adamw",
    "cosine_lr": "schedule",
    "get_batch": "data.tokens",
    "load_checkpoint": "store.checkpoint",
    "make_config": "config",
    "parse_args": "cli",
    "run": "loop",
    "save_checkpoint": "store.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
