"""Every memory-bound kernel compiles for an H100 (sm_90) through Triton's real compiler and ptxas, without a GPU.

The interpreter accepts things the compiler rejects (types that change around a loop, Python control flow on tensor
values, bad promotions), so CI also lowers each kernel the way a GPU launch would, at the launchers' block sizes.
"""

SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.cross_entropy import _cross_entropy_kernel, _scale_kernel
from kernels.rms_norm import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel
from kernels.rope import _rope_kernel
from kernels.swiglu import _swiglu_bwd_kernel, _swiglu_fwd_kernel

DT = "*bf16"
CASES = [
    (_rms_norm_fwd_kernel, dict(x_ptr=DT, w_ptr="*fp32", y_ptr=DT, rstd_ptr="*fp32", stride_x="i32", M="i32", N="i32",
                                eps="fp32"), dict(BLOCK_M=8, BLOCK_N=512), 8),
    (_rms_norm_bwd_kernel, dict(dy_ptr=DT, x_ptr=DT, w_ptr="*fp32", rstd_ptr="*fp32", dx_ptr=DT, dw_partial_ptr="*fp32",
                                stride_dy="i32", stride_x="i32", M="i32", N="i32"), dict(BLOCK_M=4, BLOCK_N=1024), 8),
    (_swiglu_fwd_kernel, dict(g_ptr=DT, u_ptr=DT, y_ptr=DT, n_elements="i64"), dict(BLOCK=2048), 4),
    (_swiglu_bwd_kernel, dict(dy_ptr=DT, g_ptr=DT, u_ptr=DT, dg_ptr=DT, du_ptr=DT, n_elements="i32"),
     dict(BLOCK=2048), 4),
    (_rope_kernel, dict(x_ptr=DT, pos_ptr="*i64", inv_freq_ptr="*fp32", y_ptr=DT, stride_xb="i64", stride_xh="i32",
                        stride_xt="i32", stride_pb="i32", stride_pt="i32", H="i32", T="i32", HALF="i32"),
     dict(INVERSE=True, BLOCK_T=32, BLOCK_HALF=32), 4),
    (_cross_entropy_kernel, dict(logits_ptr=DT, grad_ptr=DT, targets_ptr="*i64", loss_ptr="*fp32", n_valid_ptr="*i64",
                                 stride_logits="i64", stride_grad="i64", V="i32", ignore_index="i32"),
     dict(WRITE_GRAD=True, BLOCK_V=8192), 16),
    (_scale_kernel, dict(x_ptr=DT, scale_ptr="*fp32", n_elements="i32"), dict(BLOCK=2048), 4),
]
for kernel, signature, constexprs, warps in CASES:
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    assert compiled.asm["cubin"], kernel.__name__
print("compiled", len(CASES))
"""


def test_kernels_compile_for_sm90(compile_for_sm90):
    assert "compiled 7" in compile_for_sm90(SCRIPT)
