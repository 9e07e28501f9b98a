"""Fully sharded data parallelism (FSDP2, ``--parallel fsdp``); its checkpoints: train/store/sharded.py.

``shard`` applies ``torch.distributed.fsdp.fully_shard`` to each transformer block, then to the root: every rank
keeps 1/W of each parameter, its gradient and its AdamW moments (DTensors, ``Shard(0)``), all-gathers a block's
parameters in the compute dtype just before the block runs (forward, and again in backward), and reduce-scatters
its gradients in fp32 right after. The root unit (embeddings, final norm, lm_head) is gathered for the whole
forward, which matters because the fused loss reads ``lm_head.weight`` itself rather than calling ``lm_head``.
Our Triton kernels run inside unchanged: they see ordinary tensors. The Linears keep no per-step copy of their
weights (model.Linear): q, k, v and W1, W3 run as separate products on the weights FSDP gathers each time. AdamW
and gradient clipping need nothing special either: their ``torch._foreach_*`` ops run on the local shards, and the
norm's sum of squares, a ``Partial`` DTensor, is all-reduced by DTensor itself, so clipping uses the global norm.
Muon keeps its momentum sharded too and gathers each whole matrix only to orthogonalize it (train/optim/muon.py says
how, and what it costs).
"""

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from smollm_stack.model import Linear, TransformerLM
from smollm_stack.train.parallel.distributed import Dist


def shard(model: TransformerLM, device: torch.device, dtype: torch.dtype, world_size: int) -> TransformerLM:
    """Shard ``model`` in place over the ``world_size`` ranks: per block, then the root. Build the optimizer after.

    Mixed precision: fp32 master parameters, computed in ``dtype`` (bf16 on CUDA), gradients reduced in fp32.
    """
    mesh = init_device_mesh(device.type, (world_size,))
    for module in model.modules():  # a copy kept across forwards would hold every whole weight on every rank
        if isinstance(module, Linear):
            module.per_step_copy = False
    compute = None if dtype == torch.float32 else dtype
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_model(model: TransformerLM, info: Dist) -> TransformerLM | None:
    """A plain, unsharded copy of a sharded model on rank 0 (to sample from); None elsewhere. Every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, in CPU memory
    state = get_model_state_dict(model, options=options)
    if not info.main:
        return None
    device = next(iter(model.parameters())).device
    with torch.device(device):
        plain = TransformerLM(model.config)
    plain.load_state_dict(state)
    return plain
