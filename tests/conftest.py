"""Shared test set-up: without CUDA, Triton kernels run on Triton's interpreter, which must be on before import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
