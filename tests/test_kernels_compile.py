"""Every memory-bound kernel compiles for an H100 (sm_90a) through Triton's real launch path, without a GPU.

The interpreter accepts things the compiler rejects (types that change around a loop, Python control flow on tensor
values, bad promotions), so CI also lowers each op's kernels forward and backward through its own launcher, with the
argument specialization a GPU launch gets (kernels.tooling.lowering): once at a shape where every size and row is
16-byte aligned, and once at odd sizes, where the launch specializes differently (no divisibility hints).
"""

SCRIPT = """
import torch
from smollm_stack import kernels

BF16 = torch.bfloat16


def fwd_bwd(fn, *inputs, upstream=None):
    def run():
        out = fn(*inputs)
        out.backward(torch.empty_like(out) if upstream is None else upstream)
    return run


def cases(rows, width, vocab):
    leaf = lambda *shape, dtype=BF16: torch.empty(*shape, dtype=dtype).requires_grad_()
    targets = torch.zeros(rows, dtype=torch.int64)
    return {
        "rms_norm": fwd_bwd(kernels.rms_norm, leaf(rows, width), leaf(width, dtype=torch.float32)),
        # the residual add fused in (fp32 stream, bf16 branch), h and y both used
        "rms_norm add": fwd_bwd(lambda x, r, w: torch.cat([t.flatten() for t in kernels.add_rms_norm(x, r, w, 1e-5,
                                                                                                     BF16)]),
                                leaf(rows, width, dtype=torch.float32), leaf(rows, width),
                                leaf(width, dtype=torch.float32)),
        "swiglu": fwd_bwd(kernels.swiglu, leaf(rows, width), leaf(rows, width)),
        "rope": fwd_bwd(kernels.apply_rope, leaf(2, 3, rows, 16), torch.arange(rows)),
        # an upstream gradient other than 1 also launches the in-place scaling kernel
        "cross_entropy": fwd_bwd(kernels.cross_entropy, leaf(rows, vocab), targets, upstream=torch.tensor(2.0)),
    }


CASES = {f"{name} {shape}": case for shape, args in (("aligned", (64, 512, 1024)), ("odd", (7, 97, 67)))
         for name, case in cases(*args).items()}
"""


def test_kernels_compile_for_sm90(compile_for_gpu):
    launches = compile_for_gpu(SCRIPT)
    assert len(launches) == 10
    for label, records in launches.items():
        op = label.split()[0]  # each op's kernels carry its name
        assert any(op in r["name"] for r in records), (label, [r["name"] for r in records])
        for r in records:
            assert r["error"] is None and r["regs"] > 0, (label, r)
    ce = [r["name"] for r in launches["cross_entropy aligned"]]
    assert any("scale" in name for name in ce), ce
