"""bench.step --compile counts Inductor's kernels after fusion: a pointwise chain is one kernel moving its input and
its output once; a matmul stays the eager count's (an opaque call), its pointwise epilogue one kernel; the backward is
compiled up front; the compiled code never runs; what our custom ops launch stays the eager count's."""

import torch

from smollm_stack.bench.step import STEP_PHASES, compiled_step, count_step, inductor_kernels, summary
from smollm_stack.bench.train import BenchCase

CASE = BenchCase("tiny", 2, 32, dict(d_model=64, num_layers=1, num_heads=2, vocab_size=256, value_embeddings=False))


def _counted(fn, *inputs) -> list[tuple]:
    return [(r.op, r.backward, r.launches, r.read, r.written) for r in inductor_kernels(fn, *inputs)]


def test_pointwise_chain_is_one_kernel_of_its_input_and_output():
    x = torch.randn(37, 129)
    counted = _counted(lambda x: (torch.sigmoid(x) * x + 1.0).to(torch.bfloat16), x)
    assert counted == [("inductor kernel", False, 1, x.numel() * 4, x.numel() * 2)]


def test_matmul_is_left_to_the_eager_count():
    a, b = torch.randn(16, 24), torch.randn(24, 8)
    counted = _counted(lambda a, b: torch.relu(a @ b), a, b)
    assert counted == [("inductor kernel", False, 1, 16 * 8 * 4, 16 * 8 * 4)]


def test_an_fp32_output_matmul_is_left_to_the_eager_count():
    a, b = torch.randn(16, 24, dtype=torch.bfloat16), torch.randn(24, 8, dtype=torch.bfloat16)
    counted = _counted(lambda a, b: torch.relu(torch.mm(a, b, out_dtype=torch.float32)), a, b)
    assert counted == [("inductor kernel", False, 1, 16 * 8 * 4, 16 * 8 * 4)]


def test_backward_is_compiled_without_running_the_forward():
    x = torch.randn(37, 129, requires_grad=True)
    counted = _counted(lambda x: torch.sigmoid(x).sum(), x)
    n = x.numel() * 4  # the backward recomputes sigmoid(x) from x and reads the loss's scalar gradient
    assert counted == [("inductor kernel", False, 1, n, 4), ("inductor kernel", True, 1, n + 4, n)]


def test_compiled_code_never_runs():
    x = torch.randn(37, 129)
    before = x.clone()
    counted = _counted(lambda x: x.mul_(2.0), x)
    assert counted == [("inductor kernel", False, 1, x.numel() * 4, x.numel() * 4)]
    assert torch.equal(x, before)


def test_compiled_step_keeps_what_our_custom_ops_launch_and_the_fused_minimum():
    eager = count_step(CASE, "torch")
    compiled = compiled_step(eager)
    # the weight cache's one refresh of the bf16 copies, inside the stacked GEMM's body: Inductor never sees it
    refresh = [r for r in eager.records if r.op == "_foreach_copy_" and r.phase not in STEP_PHASES]
    assert len(refresh) == 1 and refresh[0] in compiled.records
    assert {r.op for r in compiled.records if r.phase == "compiled glue"} == {"inductor kernel"}
    assert summary(compiled)["fused_minimum"] == summary(eager)["fused_minimum"]  # the embedding's too
