"""Weights in the compute dtype, stacked by rows and kept until the next optimizer step: made once, read by every call.

A forward under autocast casts each fp32 weight it multiplies to bf16, and autocast forgets the cast when its
region ends, so with gradient accumulation every micro-batch pays the cast again (read 4 bytes, write 2, per weight
element). ``stacked_weight((w1, ..., wn), dtype)`` instead returns ``torch.cat((w1, ..., wn)).to(dtype)`` from a
cache, remade only when a weight changed: the copy is keyed on the weight tensors and their version counters, which
in-place updates through torch ops bump (load_state_dict, init, the foreach optimizers, ``p.add_``). Fused optimizers
(torch's fused AdamW, the trainer's default) write the parameters without bumping it, so every optimizer step also
clears the cache, through torch's global post-step hook (every torch.optim.Optimizer runs it); writes through
``.data`` bypass both and must call ``clear_weight_cache()``. Stacking is what lets one GEMM serve several
projections of one input (q, k, v; W1 and W3): the stacked copy costs nothing more than the casts it replaces.

Memory: the copies of one model's weights in the compute dtype (half the fp32 parameters' bytes under bf16), kept
between steps. A copy lives only while its first weight does (a weak-keyed table), so a dropped model frees its
copies. In fp32 without autocast a single weight is its own copy; a stack of fp32 weights is an fp32 copy.
"""

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

# first weight -> {(ids of the stacked weights, dtype): (weak refs to them, their versions, the stacked copy)}
_CACHE = WeakIdKeyDictionary()


def stacked_weight(weights, dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(weights) in dtype, without autograd, remade only after a weight changed (module docstring)."""
    weights = tuple(weights)
    if len(weights) == 1 and weights[0].dtype == dtype:
        return weights[0].detach()
    key = (tuple(map(id, weights)), dtype)
    versions = tuple(w._version for w in weights)
    entries = _CACHE.setdefault(weights[0], {})  # keyed by identity, which tensors' == is not
    entry = entries.get(key)
    if entry is None or entry[1] != versions or any(r() is not w for r, w in zip(entry[0], weights)):
        stacked = torch.empty(sum(w.shape[0] for w in weights), *weights[0].shape[1:], dtype=dtype,
                              device=weights[0].device)
        rows = 0
        for w in weights:  # cast and stack in one pass per weight
            stacked[rows : rows + w.shape[0]].copy_(w.detach())
            rows += w.shape[0]
        entry = entries[key] = (tuple(map(weakref.ref, weights)), versions, stacked)
    return entry[2]


def clear_weight_cache(*_) -> None:
    """Forget every cached copy (for code that writes a weight through .data, which the version misses)."""
    _CACHE.clear()


register_optimizer_step_post_hook(clear_weight_cache)  # a fused optimizer's step leaves the version as it was
