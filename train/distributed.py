"""Data parallelism with torch.distributed: one process per device, started by ``torchrun``.

``torchrun --nproc_per_node=N -m train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single
process and nothing here does anything. NCCL joins GPUs, gloo CPU processes (used by the CI test).
"""

import os
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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine (use --device cpu)")
    return resolved
