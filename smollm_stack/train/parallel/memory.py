"""What training costs in memory per GPU, and the one switch that trades compute for it: activation checkpointing.

Per GPU, for N parameters trained with AdamW in fp32 master weights (``bytes_per_gpu``):

- DDP replicates everything: parameters 4N, gradients 4N, Adam's two moments 8N: 16 bytes a parameter. Under
  ``--optimizer muon`` the blocks' matrices keep one momentum (4 bytes) instead, the rest Adam's two.
- FSDP2 shards all three over the W processes (16N / W) and all-gathers each block's parameters, in the compute
  dtype, just before its forward and backward. The root module (embeddings, final norm, lm_head) stays unsharded
  from its forward to its backward, and the block being computed plus the next one (prefetched) are live at once,
  so "unsharded" adds the root's and two blocks' parameters, and as much again for their gradients before the
  reduce-scatter.

Activations are what backward reads, counted per token and layer from what our kernels save (RMSNorm: its input;
the q/k/v and output projections: their inputs; attention: q, k, v, its output and a log-sum-exp per head, no
T x T scores; SwiGLU: gate and up; w2: its input), in the activation dtype::

    6 d_model + 2 d_kv + 3 d_ff elements, + (2 + num_heads) fp32 statistics

(``tests/test_fsdp.py`` holds this equal to the bytes autograd saves). With activation checkpointing a block keeps
only its input (d_model elements a token) and recomputes the rest during backward, one block at a time, so the
peak is ``L d_model`` plus one whole block. The fused loss keeps its gradients (tokens x d_model, and V x d_model
in fp32) from forward to backward. Allocator slack, communication buffers and the CUDA context (~0.5-1 GB) come on
top: "fits" below leaves 10% of the card free for them.
"""

import functools
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from smollm_stack.model import ModelConfig, hidden_matrix_params, param_counts

PARALLEL = ("ddp", "fsdp")
HEADROOM = 0.9  # the share of a card's memory an estimate may fill and still "fit"
GiB = 2**30


@dataclass
class MemoryEstimate:
    params: int  # bytes of fp32 parameters held by one GPU
    grads: int  # their gradients
    optimizer: int  # AdamW's exp_avg and exp_avg_sq (Muon's momentum for the hidden matrices)
    unsharded: int  # FSDP only: all-gathered parameters and unreduced gradients live at the peak
    activations: int  # saved for backward, at the peak of backward

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.unsharded + self.activations

    def fits(self, gpu_mem_gb: float) -> bool:
        return self.total <= HEADROOM * gpu_mem_gb * GiB


def block_activation_elements(config: ModelConfig) -> tuple[int, int]:
    """(elements in the activation dtype, fp32 elements) that one block saves for backward, per token."""
    d_kv = config.num_kv_heads * config.head_dim
    ffn = 3 * config.d_ff if config.ffn == "swiglu" else 2 * config.d_ff  # gate and up, w2's input (silu: 2)
    norms = 0 if config.norm == "none" else 2  # one rstd a row each
    # ln1's input, q/k/v's input, q, attention's output (which output_proj reads as a view: attention writes it in
    # the projections' layout), ln2's input and the FFN's input: 6 d_model (pre-norm); k and v: 2 d_kv. Without
    # value embeddings v is a view of the one q/k/v product (kernels/stacked_linear.py), which attention's saved v
    # keeps whole: d_model + d_kv more.
    stacked = 0 if config.value_embeddings else config.d_model + d_kv
    return 6 * config.d_model + 2 * d_kv + stacked + ffn, norms + config.num_heads


def bytes_per_gpu(
    config: ModelConfig,
    batch_size: int,
    dtype: torch.dtype = torch.bfloat16,
    parallel: str = "ddp",
    world_size: int = 1,
    activation_checkpointing: bool = False,
    optimizer: str = "torch",
) -> MemoryEstimate:
    """The memory one GPU needs to train ``config`` on micro-batches of ``batch_size`` full-context sequences
    with ``optimizer`` (a TrainConfig.optimizer: AdamW's two moments, or Muon's one on the hidden matrices)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    n, body = param_counts(config)
    shards = world_size if parallel == "fsdp" else 1
    matrices = hidden_matrix_params(config) if optimizer == "muon" else 0
    state = 8 * (n - matrices) + 4 * matrices
    params, grads, state = -(-4 * n // shards), -(-4 * n // shards), -(-state // shards)
    unsharded = 0
    act = torch.finfo(dtype).bits // 8
    if parallel == "fsdp" and world_size > 1:
        block = body // config.num_layers
        root = n - config.num_layers * block  # embeddings, lm_head, ln_final
        unsharded = (act + 4) * (root + 2 * block)  # parameters in the compute dtype, gradients reduced in fp32
    tokens = batch_size * config.context_length
    elements, stats = block_activation_elements(config)
    per_block = tokens * (act * elements + 4 * stats)
    if activation_checkpointing:
        blocks = config.num_layers * tokens * act * config.d_model + per_block
    else:
        blocks = config.num_layers * per_block
    loss = tokens * act * 2 * config.d_model + 4 * config.vocab_size * config.d_model  # ln_final's input, dh; dw
    return MemoryEstimate(params, grads, state, unsharded, blocks + loss)


def memory_line(config: ModelConfig, batch_size: int, dtype, parallel: str, world_size: int, ckpt: bool,
                optimizer: str) -> str:  # fmt: skip
    """The estimate in one line, as the trainer prints it at the start."""
    m = bytes_per_gpu(config, batch_size, dtype, parallel, world_size, ckpt, optimizer)
    return (
        f"memory per process ({parallel} x {world_size}{', activation checkpointing' if ckpt else ''}, estimate): "
        f"{m.total / GiB:.2f} GiB = parameters {m.params / GiB:.2f} + gradients {m.grads / GiB:.2f} + optimizer "
        f"{m.optimizer / GiB:.2f} + unsharded {m.unsharded / GiB:.2f} + activations {m.activations / GiB:.2f}"
    )


def memory_table(
    config: ModelConfig, batch_size: int, world_size: int, dtype: torch.dtype = torch.bfloat16, gpu_mem_gb=None
) -> str:
    """A Markdown table of the estimate for each parallelism, with and without activation checkpointing."""
    head = "| parallel | act. ckpt | params | grads | optimizer | unsharded | activations | total |"
    lines = [head + (" fits |" if gpu_mem_gb else ""), "|" + "---|" * (8 + bool(gpu_mem_gb))]
    for parallel in PARALLEL:
        for ckpt in (False, True):
            m = bytes_per_gpu(config, batch_size, dtype, parallel, world_size, ckpt)
            cells = [m.params, m.grads, m.optimizer, m.unsharded, m.activations, m.total]
            row = f"| {parallel} x {world_size} | {'yes' if ckpt else 'no'} | "
            row += " | ".join(f"{c / GiB:.2f} GiB" for c in cells) + " |"
            if gpu_mem_gb:
                row += f" {'yes' if m.fits(gpu_mem_gb) else 'no'} |"
            lines.append(row)
    return "\n".join(lines)


def checkpoint_blocks(model: torch.nn.Module):
    """Activation checkpointing: each transformer block of ``model`` keeps only its input for backward and
    recomputes its forward there (``torch.utils.checkpoint``, non-reentrant, so it composes with FSDP2's hooks).

    Only the blocks are recomputed: the fused loss, whose backward may run once, stays outside. Forwards without
    gradients (evaluation) or with a KV cache (sampling) run as they are. The parameter names are unchanged, so
    checkpoints do not know the difference.
    """
    for block in model.layers:
        block.forward = functools.partial(_recomputed_forward, block.forward)


def _recomputed_forward(forward, x, positions=None, kv_cache=None, doc_ids=None, value_embedding=None, branch=None,
                        add_branch=True):  # fmt: skip
    if kv_cache is not None or not torch.is_grad_enabled():
        return forward(x, positions, kv_cache, doc_ids, value_embedding, branch, add_branch)
    if branch is not None:  # the previous block's branch added here, so the block keeps one tensor, its input
        x = x + branch
    return checkpoint(forward, x, positions, None, doc_ids, value_embedding, None, add_branch, use_reentrant=False)


def fitting_setting(
    config: ModelConfig, batch_size: int, world_size: int, gpu_mem_gb: float, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, bool] | None:
    """The fastest (parallel, activation checkpointing) whose estimate fits a card of ``gpu_mem_gb``, or None.

    Fastest first: DDP (one all-reduce a step), FSDP (all-gathers too, overlapped with compute), then each with
    activation checkpointing (a second forward: about a third more compute).
    """
    for ckpt in (False, True):
        for parallel in PARALLEL:
            if bytes_per_gpu(config, batch_size, dtype, parallel, world_size, ckpt).fits(gpu_mem_gb):
                return parallel, ckpt
    return None


def memory_advice(config: ModelConfig, batch_size: int, world_size: int, gpu_mem_gb: float) -> list[str]:
    """The memory table and which setting fits the card, as lines for ``budget``."""
    lines = [
        f"memory per GPU (estimate; micro-batch {batch_size} x {config.context_length} tokens, bf16 activations, "
        f"{world_size} GPUs of {gpu_mem_gb:g} GB):",
        memory_table(config, batch_size, world_size, gpu_mem_gb=gpu_mem_gb),
    ]
    setting = fitting_setting(config, batch_size, world_size, gpu_mem_gb)
    if setting is None:
        lines.append(f"nothing fits {gpu_mem_gb:g} GB: lower --batch-size (raise --grad-accum) or add GPUs")
    else:
        ckpt = " --activation-checkpointing" if setting[1] else ""
        lines.append(f"fits with: --parallel {setting[0]}{ckpt} --batch-size {batch_size}")
    return lines
