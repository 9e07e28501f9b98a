"""Data parallelism with torch.distributed: one process per device, started by ``torchrun``.

``torchrun --nproc_per_node=N -m smollm_stack.train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them the
run is a single process and nothing here does anything. NCCL joins GPUs, gloo CPU processes (used by the CI test).
Across nodes (``torchrun --nnodes``) LOCAL_RANK counts the processes of one node: its first one prepares the node's
data cache.
"""

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, plots, samples and writes checkpoints."""
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        """The first process of its node prepares the node's data cache (nodes need not share a filesystem)."""
        return self.local_rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (every rank gets it); a no-op for one process."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def accumulating(model: torch.nn.Module, last: bool):
    """The context of one micro-step's forward and backward under ``--grad-accum``.

    DDP skips its all-reduce until the last micro-step (``no_sync``). FSDP reduce-scatters every micro-step on
    purpose: skipping it would hold unsharded fp32 gradients of the whole model, the memory FSDP exists to save.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return nullcontext()


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; the rank info and this process's device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(), resolve_device(device)
    info = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", info.local_rank)  # one GPU per process, whatever index --device named
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return info, resolved


def shutdown(info: Dist):
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str) -> torch.device:
    """auto: CUDA if there is one, else the CPU (MPS only when asked for: torch's MPS lacks ops we use)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine (use --device cpu)")
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps needs Apple silicon and a torch built with MPS, not found here (use cpu)")
        if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") != "1":  # torch reads it at import: too late to set it
            print(MPS_FALLBACK_NOTE, file=sys.stderr)
    return resolved


MPS_FALLBACK_NOTE = (
    "note: --device mps runs the eager kernels; an op torch's MPS backend lacks stops the run with "
    "NotImplementedError unless PYTORCH_ENABLE_MPS_FALLBACK=1 is set before starting, which runs such ops on the CPU"
)
