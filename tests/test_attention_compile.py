"""The attention kernels compile for an H100 (sm_90) through Triton's real compiler and ptxas, without a GPU.

The interpreter accepts things the compiler rejects, so CI also lowers each kernel as a GPU launch would: bf16 at
head dim 128 (the heaviest) with the first Hopper candidate its autotune list keeps there, causal, and fp32 (the FMA
path with input_precision="ieee") non-causal at head dim 32 with its fallback config.
"""

SCRIPT = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import attention as A

POINTERS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}


def compile_for_sm90(kernel, dtype, config, **constexprs):
    constexprs = {**constexprs, **config.kwargs}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in POINTERS:
            signature[name] = "*" + dtype
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    assert compiled.asm["cubin"], kernel.__name__


count = 0
for tuned in (A._attn_fwd, A._attn_bwd_dkdv, A._attn_bwd_dq):
    bf16 = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(0, dtype=torch.bfloat16)}, HEAD_DIM=128)[0]
    fp32 = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(0)}, HEAD_DIM=32)[0]
    compile_for_sm90(tuned.fn, "bf16", bf16, HEAD_DIM=128, CAUSAL=True, DOT_PRECISION="tf32")
    compile_for_sm90(tuned.fn, "fp32", fp32, HEAD_DIM=32, CAUSAL=False, DOT_PRECISION="ieee")
    count += 2
compile_for_sm90(A._attn_bwd_delta, "bf16", triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1), HEAD_DIM=64)
print("compiled", count + 1)
"""


def test_attention_kernels_compile_for_sm90(compile_for_sm90):
    assert "compiled 7" in compile_for_sm90(SCRIPT)
