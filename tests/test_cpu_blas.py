"""kernels.cpu_blas: x @ W^T through OpenBLAS, forward and backward, against fp64 products, and when it is chosen.

The bound is the classical one for a dot product of k fp32 terms (each product and each partial sum rounded once):
elementwise |computed - exact| <= k * u32 * (|A| @ |B|), with one more u for the upstream gradient's rounding to fp32
on the backward products. Measured against |A| @ |B| rather than the result, because random signs make results
near zero whose error is set by the terms' sizes.
"""

import pytest
import torch

from conftest import UNIT
from smollm_stack.kernels import cpu_blas

U32 = UNIT[torch.float32]
pytestmark = pytest.mark.skipif(not cpu_blas._openblas(), reason="numpy is not built with OpenBLAS")


def assert_product_near(actual, a, b, k_extra=0, name=""):
    """actual ~ a @ b (fp64 inputs), within (k + k_extra) u32 |a| @ |b| elementwise."""
    bound = (a.shape[-1] + k_extra) * U32 * (a.abs() @ b.abs())
    err = (actual.double() - a @ b).abs()
    assert (err <= bound).all(), f"{name}: max error / bound {(err / bound).max().item():.3g}"


def linear_and_grads(x, w, dy, blas: str):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with cpu_blas.route(blas):
        y = cpu_blas.linear(x, w)
        y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("view", ["contiguous", "strided"])
def test_linear_forward_and_backward(threads, view):
    """(2, 211, 19) @ (53, 19)^T: 422 rows in 3 ragged blocks at 3 threads; the strided x is a transposed view."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 211, 19, generator=g)
    if view == "strided":
        x = torch.randn(211, 2, 19, generator=g).transpose(0, 1)
    w, dy = torch.randn(53, 19, generator=g), torch.randn(2, 211, 53, generator=g)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, dx, dw = linear_and_grads(x, w, dy, "openblas")
    finally:
        torch.set_num_threads(saved)
    x2, w64, dy2 = x.double().reshape(-1, 19), w.double(), dy.double().reshape(-1, 53)
    assert y.shape == (2, 211, 53) and dx.shape == x.shape and dw.shape == w.shape
    assert_product_near(y.reshape(-1, 53), x2, w64.t(), name="y")
    assert_product_near(dx.reshape(-1, 19), dy2, w64, k_extra=1, name="dx")
    assert_product_near(dw, dy2.t(), x2, k_extra=1, name="dw")


def test_mm_of_transposed_operands():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(90, 130, generator=g).t(), torch.randn(90, 17, generator=g)
    with cpu_blas.route("openblas"):
        out = cpu_blas.mm(a, b)
    assert_product_near(out, a.double(), b.double())


def test_route_takes_openblas_only_for_large_fp32_products_on_amd(monkeypatch):
    side = cpu_blas.MIN_SIDE
    big, small = (side, side, side), (side, side - 1, 4 * side)
    x = torch.empty(1)
    for amd in (True, False):
        monkeypatch.setattr(cpu_blas, "_amd_cpu", lambda amd=amd: amd)
        assert cpu_blas._use_openblas(x, *big) == amd
        assert not cpu_blas._use_openblas(x, *small)
        assert not cpu_blas._use_openblas(x.to(torch.bfloat16), *big)
        with cpu_blas.route("torch"):
            assert not cpu_blas._use_openblas(x, *big)
        with cpu_blas.route("openblas"):
            assert cpu_blas._use_openblas(x, *small)
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_blas.route("openblas"):
        assert not cpu_blas._use_openblas(x, *big)


def test_bad_route_and_shapes_are_refused():
    with pytest.raises(ValueError, match="route must be one of"):
        with cpu_blas.route("mkl"):
            pass
    with pytest.MonkeyPatch.context() as mp:  # a bad $SMOLLM_CPU_BLAS: one error naming it, at the first product
        mp.setattr(cpu_blas._ROUTE, "current", "mkl")
        with pytest.raises(ValueError, match=r"\$SMOLLM_CPU_BLAS must be one of .*'mkl'"):
            cpu_blas.mm(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"mm needs \(m, k\) @ \(k, n\)"):
        cpu_blas.mm(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="linear needs"):
        cpu_blas.linear(torch.ones(2, 3), torch.ones(4, 5))


def test_bench_dry_run(capsys):
    from smollm_stack.bench import cpu_blas as bench_cpu_blas

    assert bench_cpu_blas.main(["--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "| tiny | attention proj y = x W^T | 64 x 128 x 128 |" in report and "| tiny | openblas |" in report
