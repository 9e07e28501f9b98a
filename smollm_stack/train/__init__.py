"""The trainer: ``smollm train`` (see ``train.config`` for every option) and the pieces it is made of."""

import os

# On a busy CPU, OpenMP threads that spin at barriers while a sibling is descheduled slow torch down 5-10x (2 cores,
# 2 threads, tiny preset: 4,000 -> 500 tokens/s); sleeping instead costs nothing we could measure. It must be set
# before torch loads OpenMP, hence here, first; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from smollm_stack.train.checkpoint import load_checkpoint, save_checkpoint
from smollm_stack.train.config import TrainConfig, parse_args
from smollm_stack.train.dataset import get_batch
from smollm_stack.train.loop import run
from smollm_stack.train.optim import AdamW, clip_grad_norm
from smollm_stack.train.schedule import cosine_lr

__all__ = [
    "AdamW",
    "TrainConfig",
    "clip_grad_norm",
    "cosine_lr",
    "get_batch",
    "load_checkpoint",
    "parse_args",
    "run",
    "save_checkpoint",
]
