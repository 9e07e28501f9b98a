"""kernels/weight_cache.py: the per-step copies are never stale, are remade together in one _foreach_copy_ after a
step of any kind, and go with their weights.

The copies are compared exactly: a copy is torch.cat(weights).to(dtype), the same rounding of the same numbers.
"""

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smollm_stack.kernels import weight_cache
from smollm_stack.kernels.weight_cache import stacked_weight
from smollm_stack.model import ModelConfig, TransformerLM

SHAPES = {"q": (12, 5), "k": (6, 5), "v": (6, 5), "w1": (7, 5), "w3": (7, 5), "w2": (5, 7), "head": (9, 5)}
STACKS = (("q", "k", "v"), ("w1", "w3"), ("w2",), ("head",))


def make_params(seed: int = 0) -> torch.nn.ParameterDict:
    torch.manual_seed(seed)
    return torch.nn.ParameterDict({n: torch.nn.Parameter(torch.randn(*shape)) for n, shape in SHAPES.items()})


def copies(params, dtype=torch.bfloat16) -> list[torch.Tensor]:
    return [stacked_weight([params[n] for n in stack], dtype) for stack in STACKS]


def held(params) -> list[weakref.ref]:
    """Weak refs to the copies cached for ``params``' weights (keyed on the first weight of each stack)."""
    return [weakref.ref(e.copy) for p in params for e in weight_cache._CACHE.get(p, {}).values()]


@pytest.fixture(autouse=True)
def no_other_copies():
    """Copies left by other tests' models would join the refreshes counted here."""
    weight_cache.clear_weight_cache()


class CopyOps(TorchDispatchMode):
    """Records each op that copies tensors, with how many it copies."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("copy_", "_foreach_copy_", "_to_copy", "cat", "stack", "clone"):
            self.ops.append((name, len(args[0]) if name.startswith("_foreach") else 1))
        return func(*args, **(kwargs or {}))


def optimizer_step(**options):
    def step(params):
        optimizer = torch.optim.AdamW(params.parameters(), lr=0.1, **options)
        for p in params.values():
            p.grad = torch.randn_like(p)
        optimizer.step()

    return step


def add_in_place(params):
    with torch.no_grad():  # two weights of two stacks: the copies of q, k, v and of w2
        params["k"].add_(1.0)
        params["w2"].add_(1.0)


def load_state_dict(params):
    params.load_state_dict(make_params(seed=1).state_dict())


CHANGES = {  # a change to the weights, and how many weights' copies it leaves stale
    "fused adamw": (optimizer_step(fused=True), 7),  # writes the weights without bumping their versions
    "foreach adamw": (optimizer_step(foreach=True), 7),
    "in-place add_": (add_in_place, 4),
    "load_state_dict": (load_state_dict, 7),
}


@pytest.mark.parametrize("change", CHANGES)
def test_every_stale_copy_is_remade_at_once_after_any_change(change):
    params = make_params()
    copies(params)
    apply, stale = CHANGES[change]
    apply(params)
    with CopyOps() as recorded:
        after = copies(params)
    assert recorded.ops == [("_foreach_copy_", stale)]  # not one copy per weight
    for stack, copy in zip(STACKS, after, strict=True):
        expected = torch.cat([params[n].detach() for n in stack]).to(torch.bfloat16)
        torch.testing.assert_close(copy, expected, rtol=0, atol=0)
        assert not copy.requires_grad
    with CopyOps() as recorded:
        copies(params)
    assert recorded.ops == []  # fresh until the next change


def test_copies_are_made_by_dtype():
    params = make_params()
    copies(params, torch.bfloat16), copies(params, torch.float16)
    add_in_place(params)
    with CopyOps() as recorded:
        half = copies(params, torch.float16)
    assert recorded.ops == [("_foreach_copy_", 4)]  # the bf16 copies wait for their own first read
    torch.testing.assert_close(half[0], torch.cat([params[n].detach() for n in STACKS[0]]).half(), rtol=0, atol=0)


def test_a_copy_made_under_inference_mode_is_an_ordinary_tensor():
    params = make_params()
    with torch.inference_mode():
        made = copies(params)
    assert not any(c.is_inference() for c in made)
    optimizer_step(fused=True)(params)
    torch.testing.assert_close(copies(params)[1], torch.cat([params["w1"], params["w3"]]).detach().bfloat16())


def test_a_dropped_model_frees_its_copies():
    model = TransformerLM(ModelConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2,
                                      backend="eager"))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(2):  # the second forward remakes the copies
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, ids).backward()
        optimizer.step()
    made = held(model.parameters())
    assert len(made) == 2 * 4  # per block q k v, o, w1 w3, w2 (the eager loss casts lm_head's weight itself)
    del model, optimizer
    gc.collect()
    assert all(ref() is None for ref in made)


def test_a_copy_nobody_reads_is_forgotten():
    """A model that stopped running is remade once more with the others, then frees its copies."""
    trained, idle = make_params(), make_params(seed=2)
    copies(trained), copies(idle)
    step = optimizer_step(fused=True)
    step(trained)
    with CopyOps() as recorded:
        copies(trained)
    assert recorded.ops == [("_foreach_copy_", 14)]  # the idle model's copies were read since they were made
    idle_copies = held(idle.values())
    step(trained)
    with CopyOps() as recorded:
        copies(trained)
    assert recorded.ops == [("_foreach_copy_", 7)]
    gc.collect()
    assert idle_copies and all(ref() is None for ref in idle_copies)
    torch.testing.assert_close(copies(idle)[3], idle["head"].detach().bfloat16(), rtol=0, atol=0)  # made again
