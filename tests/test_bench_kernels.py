"""bench.kernels' accounting: the bytes and FLOPs each row is credited with, and the baseline of the fused loss."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smollm_stack.bench import kernels as bench_kernels
from smollm_stack.kernels import eager

SHAPE = bench_kernels.DRY_RUN_SHAPE
N, V = SHAPE.batch * SHAPE.seq, SHAPE.vocab


def _cases() -> dict:
    return {c.op: c for c in bench_kernels._cases(SHAPE, torch.float32, torch.device("cpu"))}


def _row(case, mode: str, provider: str) -> dict:
    return bench_kernels._row(SHAPE, case, mode, provider, bench_kernels.Timing((1.0, 1.0, 1.0), "wall"), None, None)


def test_our_losses_are_credited_with_the_gradients_their_forward_computes():
    cases = _cases()
    ce, flce = cases["cross_entropy"], cases["fused_linear_cross_entropy"]
    logits = N * V * 4  # fp32 bytes, over 1 ms
    assert _row(ce, "fwd", "triton")["gbs"] == 2 * logits / 1e6  # read the logits, write their gradient
    assert _row(ce, "fwd", "eager")["gbs"] == logits / 1e6  # the loss alone: read the logits
    assert _row(ce, "fwd+bwd", "triton")["gbs"] == _row(ce, "fwd+bwd", "eager")["gbs"] == 2 * logits / 1e6
    matmul = 2.0 * N * SHAPE.d_model * V / 1e9  # TFLOP/s over 1 ms
    assert _row(flce, "fwd", "triton")["tflops"] == _row(flce, "fwd+bwd", "eager")["tflops"] == 3 * matmul
    assert _row(flce, "fwd", "eager")["tflops"] == matmul


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm"):
            self.shapes.append(tuple(out.shape))
        return out


def test_the_fused_loss_is_raced_against_the_unchunked_eager_loss(monkeypatch):
    monkeypatch.setattr(eager, "CPU_CHUNK_ROWS", 4)  # kernels.eager's fused loss would make logits of 4 rows
    flce = _cases()["fused_linear_cross_entropy"]
    with _MatmulShapes() as seen:
        flce.eager(*flce.inputs)
    assert seen.shapes == [(N, V)]  # the logits, whole
