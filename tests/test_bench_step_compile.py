"""bench.step --compile counts Inductor's kernels after fusion: a pointwise chain is one kernel moving its input and
its output once; a matmul stays the eager count's (an opaque call), its pointwise epilogue one kernel."""

import torch

from smollm_stack.bench.step import Record, inductor_kernels


def _compiled_records(fn, *inputs) -> list[Record]:
    records = []
    torch._dynamo.reset()
    with inductor_kernels(records, [False]):
        torch.compile(fn, fullgraph=True)(*inputs)
    return records


def test_pointwise_chain_is_one_kernel_of_its_input_and_output():
    x = torch.randn(37, 129)
    records = _compiled_records(lambda x: (torch.sigmoid(x) * x + 1.0).to(torch.bfloat16), x)
    assert [(r.op, r.launches, r.read, r.written) for r in records] == [("inductor kernel", 1, x.numel() * 4,
                                                                          x.numel() * 2)]  # fmt: skip


def test_matmul_is_left_to_the_eager_count():
    a, b = torch.randn(16, 24), torch.randn(24, 8)
    records = _compiled_records(lambda a, b: torch.relu(a @ b), a, b)
    assert [(r.op, r.read, r.written) for r in records] == [("inductor kernel", 16 * 8 * 4, 16 * 8 * 4)]
