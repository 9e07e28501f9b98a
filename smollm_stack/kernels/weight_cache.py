"""Weights in the compute dtype, stacked by rows and kept until the next optimizer step: made once, read by every call.

A forward under autocast casts each fp32 weight it multiplies to bf16, and autocast forgets the cast when its
region ends, so with gradient accumulation every micro-batch pays the cast again (read 4 bytes, write 2, per weight
element). ``stacked_weight((w1, ..., wn), dtype)`` instead returns ``torch.cat((w1, ..., wn)).to(dtype)`` from a
cache, remade only when a weight changed: the copy is keyed on the weight tensors and their version counters, which
in-place updates through torch ops bump (load_state_dict, init, the foreach optimizers, ``p.add_``). Fused optimizers
(torch's fused AdamW, the trainer's default) write the parameters without bumping it, so every optimizer step also
marks every copy stale, through torch's global post-step hook (every torch.optim.Optimizer runs it); writes through
``.data`` bypass both and must call ``clear_weight_cache()``. Stacking is what lets one GEMM serve several
projections of one input (q, k, v; W1 and W3): the stacked copy costs nothing more than the casts it replaces.

All the copies in one launch: every copy made is remembered, and the first read after a step remakes every stale
copy of that device and dtype at once, with one ``torch._foreach_copy_`` per source dtype. CUDA runs it as
multi_tensor_apply launches of up to 320 chunks of 65,536 elements (and up to 64 tensors) instead of one ``copy_``
per weight. The bytes stay those of the casts (read 4, write 2 per element); only launches go. At the 125M preset
(tied embeddings) the copies are 12 x (q, k, v; o; W1, W3; W2) + lm_head: 49 copies of 85 weights, 123.5M elements,
741 MB a step (0.25 ms at 3 TB/s) in 6 launches (1,885 chunks) rather than 85 (bench.step counts both). Only copies
read since their last refresh are remade: a stale one nobody read since is forgotten instead, so a model that
stopped running (one only evaluated now and then, say) is refreshed at most once more and then frees its copies.

Memory: the copies of one model's weights in the compute dtype (half the fp32 parameters' bytes under bf16), kept
between steps; each refresh allocates new ones and drops the old, one copy at a time (the caching allocator hands
the same blocks back). A copy lives only while its first weight does (a weak-keyed table), so a dropped model frees
its copies. In fp32 without autocast a single weight is its own copy; a stack of fp32 weights is an fp32 copy.
Copies are ordinary tensors even when made under inference_mode, so autograd may save one.
"""

import weakref
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(eq=False)
class _Entry:
    """One stacked copy, the weights it is made of and what it was made from."""

    refs: tuple  # weak refs to the stacked weights
    versions: tuple | None = None  # their version counters at the last refresh; None: never made
    copy: torch.Tensor | None = None
    stepped: bool = False  # an optimizer step ran since the last refresh
    read: bool = True  # read since the last refresh: refreshed with the others, else forgotten

    def weights(self) -> tuple | None:
        weights = tuple(r() for r in self.refs)
        return None if any(w is None for w in weights) else weights

    def fresh(self, weights) -> bool:
        return not self.stepped and self.versions == tuple(w._version for w in weights)


# first weight -> {(ids of the stacked weights, dtype): its _Entry}
_CACHE = WeakIdKeyDictionary()


def stacked_weight(weights, dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(weights) in dtype, without autograd, remade only after a weight changed (module docstring)."""
    weights = tuple(weights)
    if len(weights) == 1 and weights[0].dtype == dtype:
        return weights[0].detach()
    entries = _CACHE.setdefault(weights[0], {})  # keyed by identity, which tensors' == is not
    key = (tuple(map(id, weights)), dtype)
    entry = entries.get(key)
    if entry is None or any(r() is not w for r, w in zip(entry.refs, weights)):
        entry = entries[key] = _Entry(tuple(map(weakref.ref, weights)))
    if not entry.fresh(weights):
        _refresh(entry, weights[0].device, dtype)
    entry.read = True
    return entry.copy


def _stale_entries(wanted: _Entry, device: torch.device, dtype: torch.dtype) -> list:
    """(entry, weights) of each stale copy in dtype on device to refresh; forgets the dead and the unread ones."""
    stale = []
    for entries in list(_CACHE.values()):
        for key, entry in list(entries.items()):
            weights = entry.weights()
            if weights is None or (not entry.read and entry is not wanted and not entry.fresh(weights)):
                del entries[key]  # a weight is gone, or nobody read the copy since it was last made
            elif key[1] == dtype and weights[0].device == device and not entry.fresh(weights):
                stale.append((entry, weights))
    return stale


def _refresh(wanted: _Entry, device: torch.device, dtype: torch.dtype) -> None:
    """Remake ``wanted`` and every other stale copy on its device in its dtype, one _foreach_copy_ per source dtype."""
    lists = {}  # source dtype -> (rows of the copies, weights)
    with torch.inference_mode(False):  # ordinary tensors even under inference_mode; the detached sources: no autograd
        for entry, weights in _stale_entries(wanted, device, dtype):
            rows = sum(w.shape[0] for w in weights)  # a new copy: one held from before the step stays as it was
            entry.copy = torch.empty(rows, *weights[0].shape[1:], dtype=dtype, device=device)
            for part, w in zip(entry.copy.split([w.shape[0] for w in weights]), weights):
                dsts, srcs = lists.setdefault(w.dtype, ([], []))
                dsts.append(part)
                srcs.append(w.detach())
            entry.versions = tuple(w._version for w in weights)
            entry.stepped = entry.read = False
        for dsts, srcs in lists.values():  # CUDA's one-launch path: one source dtype, like layouts (contiguous)
            torch._foreach_copy_(dsts, srcs)


def _mark_stepped(*_) -> None:
    for entries in _CACHE.values():
        for entry in entries.values():
            entry.stepped = True


def clear_weight_cache() -> None:
    """Forget every cached copy (for code that writes a weight through .data, which the version misses)."""
    _CACHE.clear()


register_optimizer_step_post_hook(_mark_stepped)  # a fused optimizer's step leaves the versions as they were
