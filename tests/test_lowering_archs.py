"""Static gates below Hopper: the code a T4 (sm_75), A100 (sm_80), RTX 3090 (sm_86) and L4 / RTX 4090 (sm_89) would
run, read from compiles in CI through the real launch path with each card's limits (kernels.tooling.lowering.DEVICES).

At the presets' shapes (TinyStories-17M: head dim 32, 125M: head dim 64, at bench.kernels' batches), to keep the
suite's time: in fp16, the dtype every card runs (--dtype auto trains a T4 in it; bf16 takes the same mma.sync path
from sm_80 with the same tiles, and `python -m smollm_stack.bench.lowering` reports it: the same registers, spills
and shared memory). Every attention config the pruner keeps for the card (kernels.attention.kept_configs: by
capability and shared memory) is compiled.
A change that regresses one of these properties fails here:

- every kept attention config compiles, fits the card's shared memory (a launch that would not fit is an error) and
  spills nothing;
- every tl.dot of the attention kernels is on tensor cores: its TTGIR result has an mma layout and the PTX has
  mma.sync (wgmma is Hopper's alone);
- the memory-bound kernels move at least 3/4 of their bytes in 16-byte vectors and spill nothing, on every card.

On sm_75 Triton 3.9 lowers every kernel, but gives tl.dot no tensor-core layout there: each of attention's dots is FMA,
and the kept configs spill 290 to 3229 instructions (bench/records/2026-12-07-lowering-archs). So a T4 runs our
memory-bound kernels, gated here like every card's, and the eager attention (kernels.ops below capability 8.0, tested
last); bf16 is refused there before any kernel runs (train/precision.py).
"""

import pytest
import torch
from test_lowering_gates import ATTENTION_KERNELS, MEMORY_BOUND_OPS, MEMORY_BOUND_SCRIPT
from test_lowering_gates import _no_spills, _problems, _vectors

from smollm_stack import kernels
from smollm_stack.kernels import attention
from smollm_stack.kernels.attention import TUNING
from smollm_stack.kernels.tooling.lowering import DEVICES

TARGETS = ("sm_75", "sm_80", "sm_86", "sm_89")
ATTENTION_TARGETS = TARGETS[1:]  # a T4 takes the eager attention

ATTENTION_SCRIPT = """
import torch
from smollm_stack.kernels import attention as A

PRESETS = {"tinystories-17m": (128, 16, 256, 32), "125m": (16, 12, 1024, 64)}  # batch, heads, tokens, head dim
DTYPES = {"sm_80": ["float16"], "sm_86": ["float16"], "sm_89": ["float16"]}


def forward(B, H, T, d, dtype):
    x = torch.empty(B, H, T, d, dtype=dtype)
    return lambda: A._forward(x, x, x, True, d ** -0.5)


def backward(B, H, T, d, dtype):
    x, lse = torch.empty(B, H, T, d, dtype=dtype), torch.empty(B, H, T)
    return lambda: A._backward(x, x, x, x, x, lse, True, d ** -0.5)


CASES = {f"{target} {name} {dtype} {pass_}": make(*shape, getattr(torch, dtype))
         for target, dtypes in DTYPES.items() for dtype in dtypes for name, shape in PRESETS.items()
         for pass_, make in (("forward", forward), ("backward", backward))}
"""

# The Hopper gates' memory-bound cases in fp16, once per card (2-byte elements vectorize alike in fp16 and bf16).
MEMORY_BOUND_ARCH_SCRIPT = MEMORY_BOUND_SCRIPT.replace("BF16 = torch.bfloat16", "BF16 = torch.float16") + f"""
CASES = {{f"{{target}} {{label}}": case for target in {TARGETS!r} for label, case in CASES.items()}}
"""


@pytest.fixture(scope="module")
def launches(compile_for_gpu):
    """Every card's cases in one pool of workers, which keeps both cores busy to the end."""
    script = f"{MEMORY_BOUND_ARCH_SCRIPT}\n_MEMORY_BOUND = CASES\n{ATTENTION_SCRIPT}\nCASES |= _MEMORY_BOUND\n"
    return compile_for_gpu(script)


def _on_tensor_cores(r: dict) -> str | None:
    if r["error"] or r["name"] not in ATTENTION_KERNELS:
        return _no_spills(r)
    if not (r["dots"] and r["tensor_core_dots"] == r["dots"] and r["mma_sync"]):
        return f"{r['tensor_core_dots']} of {r['dots']} dots on tensor cores, {r['mma_sync']} mma.sync"
    return _no_spills(r)


def _cases(launches: dict, target: str, attention: bool) -> dict:
    """The target's attention cases, or its memory-bound ones."""
    return {label: records for label, records in launches.items()
            if label.split()[0] == target and (label.split()[1] not in MEMORY_BOUND_OPS) == attention}  # fmt: skip


@pytest.mark.parametrize("target", ATTENTION_TARGETS)
def test_attention_fits_spills_nothing_and_dots_on_tensor_cores(launches, target):
    card = DEVICES[target]
    cases = _cases(launches, target, attention=True)
    for label, records in cases.items():
        for kernel in ATTENTION_KERNELS[:1] if label.endswith("forward") else ATTENTION_KERNELS[1:]:
            ours = [r for r in records if r["name"] == kernel]
            kept = _kept(kernel, ours[0]["config"]["HEAD_DIM"], (card.capability, card.smem_per_block))
            compiled = [tuple(r["config"][k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")) for r in ours]
            assert sorted(compiled) == sorted(kept), (label, kernel)  # every config kept for this card, no other
    problems = [p for label, records in cases.items() for p in _problems(records, label, _on_tensor_cores)]
    assert cases and not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_memory_bound_kernels_keep_16_byte_vectors(launches, target):
    cases = _cases(launches, target, attention=False)
    problems = [p for label, records in cases.items() for p in _problems(records, label, _vectors)]
    assert cases and all(cases.values()) and not problems, "\n".join(problems)


# A dot the backend cannot put on tensor cores (fp32 inputs with input_precision="ieee": FMA) beside one it can.
DOT_SCRIPT = """
import torch
import triton
import triton.language as tl


@triton.jit
def square(X, Y, PRECISION: tl.constexpr):
    offs = tl.arange(0, 32)
    x = tl.load(X + offs[:, None] * 32 + offs[None, :])
    tl.store(Y + offs[:, None] * 32 + offs[None, :], tl.dot(x, x, input_precision=PRECISION).to(x.dtype))


x16, x32 = torch.empty(32, 32, dtype=torch.float16), torch.empty(32, 32)
CASES = {"sm_80 mma": lambda: square[(1,)](x16, x16, PRECISION="tf32"),
         "sm_80 fma": lambda: square[(1,)](x32, x32, PRECISION="ieee")}
"""


def test_the_gates_see_a_dot_off_the_tensor_cores(compile_for_gpu):
    launches = compile_for_gpu(DOT_SCRIPT)
    (mma,), (fma,) = launches["sm_80 mma"], launches["sm_80 fma"]
    assert mma["dots"] == mma["tensor_core_dots"] == 1 and mma["mma_sync"] > 0, mma
    assert fma["dots"] == 1 and fma["tensor_core_dots"] == 0 and fma["mma_sync"] == 0, fma
    assert "0 of 1 dots on tensor cores" in _on_tensor_cores({**fma, "name": ATTENTION_KERNELS[0]})


def _kept(kernel: str, head_dim: int, target: tuple[int, int]) -> list[tuple]:
    configs = attention.kept_configs(kernel, torch.float16, head_dim, False, target)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


def test_attention_configs_are_kept_per_card():
    """By the card's shared memory (an RTX 3090's 99 KB drops the forward's widest tile at head dim 64 and leaves only
    the small config at 128), by capability (a config that spills on mma.sync stays on Hopper), and on a T4, whose
    dots are FMA, only the small config."""
    t4, rtx3090, h100 = (75, 64 * 1024), (86, 99 * 1024), (90, 227 * 1024)
    assert _kept("_attn_fwd", 64, rtx3090) == [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)]
    assert _kept("_attn_fwd", 64, h100) == [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)]
    assert _kept("_attn_fwd", 128, rtx3090) == [(32, 32, 4, 2)]
    assert (128, 64, 8, 4) not in _kept("_attn_fwd", 32, rtx3090) and (128, 64, 8, 4) in _kept("_attn_fwd", 32, h100)
    assert all(_kept(kernel, 64, t4) == [TUNING[kernel].fp32] for kernel in TUNING)


def test_below_capability_8_the_triton_backend_takes_eager_attention(monkeypatch):
    """Triton lowers attention's dots for sm_75 without tensor cores, so on a T4 (faked here) the model's Triton ops
    are ours but for attention, which is the eager op; from an A100 on, all ours."""
    for capability, chosen in (((7, 5), kernels.eager.flash_attention), ((8, 0), kernels.flash_attention)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        ops = kernels.ops("triton", "cuda")
        assert ops.flash_attention is chosen and ops.rms_norm is kernels.rms_norm, capability
    assert kernels.ops("triton", "cpu").flash_attention is kernels.flash_attention
