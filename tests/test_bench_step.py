"""bench.step: the counted step of a tiny model, checked op by op against counts worked out by hand, and its refusal
to count an op it has no rule for."""

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

from smollm_stack.bench import step as bench_step
from smollm_stack.bench.train import BenchCase
from smollm_stack.model.accounting import flops_per_token

# One block: d 64, 2 heads of 32, d_ff 192 (8/3 x 64 rounded to 64), V 256; 2 x 32 = 64 tokens, AdamW.
B, T, D, H, DH, FF, V = 2, 32, 64, 2, 32, 192, 256
N = B * T
CASE = BenchCase("tiny", B, T, dict(d_model=D, num_layers=1, num_heads=H, vocab_size=V, value_embeddings=False))


@pytest.fixture(scope="module")
def adamw_step():
    return bench_step.count_step(CASE, "torch")


def rows(step, phase, backward=False):
    return [(r.op, r.read, r.written, r.flops) for r in step.records if r.phase == phase and r.backward == backward]


# The per-step bf16 copies of the fp32 weights (kernels/weight_cache.py; the counted step follows an optimizer step),
# all remade at the first read (q, k, v's) by one _foreach_copy_: every weight read, its rows of its copy written.
WEIGHTS = 4 * D * D + 3 * D * FF + V * D  # q, k, v, o; w1, w3, w2; lm_head
REFRESH = ("_foreach_copy_", 4 * WEIGHTS, 2 * WEIGHTS, 0)


def gemm(inp: int, out: int):
    """The bf16 GEMM of the N tokens against a (stacked) copy with ``out`` rows."""
    return ("mm", 2 * N * inp + 2 * inp * out, 2 * N * out, 2 * N * inp * out)


def test_block_forward_counted_by_hand(adamw_step):
    # ln1 reads the fp32 residual and gain, writes bf16 (cast_output) and fp32 1/rms per row; ln2 and ln_final add
    # the bf16 branch first, and write the fp32 sum too
    norm = ("_rms_norm_fwd_kernel", 4 * N * D + 4 * D, 2 * N * D + 4 * N, 0)
    add_norm = ("_rms_norm_fwd_kernel", 6 * N * D + 4 * D, 6 * N * D + 4 * N, 0)
    assert rows(adamw_step, "norm") == [norm, add_norm]
    assert rows(adamw_step, "final norm") == [add_norm]
    rope = ("_rope_kernel", 2 * 2 * N * D + 8 * T + 4 * DH // 2, 2 * 2 * N * D, 0)  # q, k, positions, inv_freq
    attn = ("_attn_fwd", 3 * 2 * N * D, 2 * N * D + 4 * B * H * T, 2 * 2 * B * H * T * T * DH / 2)  # causal half
    assert rows(adamw_step, "attention") == [
        REFRESH, gemm(D, 3 * D),  # q, k, v: one GEMM on their stacked copy
        ("arange", 0, 8 * T, 0), rope, attn,  # O laid out (B, T, H, dh): output_proj reads it as a view
        gemm(D, D),
    ]  # fmt: skip
    assert rows(adamw_step, "ffn") == [
        gemm(D, 2 * FF),  # W1, W3
        ("_swiglu_fwd_kernel", 2 * 2 * N * FF, 2 * N * FF, 0),  # reads the two halves in place
        gemm(FF, D),
    ]  # fmt: skip
    assert rows(adamw_step, "residual") == []  # every residual add rides in a norm
    assert rows(adamw_step, "embedding") == [("embedding", 8 * N + 4 * N * D, 4 * N * D, 0)]  # the gathered rows


def test_norm_backward_counted_by_hand(adamw_step):
    # Reads bf16 dy, the fp32 norm input and gain and 1/rms; writes fp32 dx and dw partial sums of the interpreter's
    # 4 programs. With the add: reads the stream's fp32 gradient dh too (not at ln_final, whose sum has no later
    # use) and writes dx again in the branch's bf16.
    dw_sum = ("sum", 4 * 4 * D, 4 * D, 0)
    reads, writes = 2 * N * D + 4 * N * D + 4 * D + 4 * N, 4 * N * D + 4 * 4 * D
    norm = ("_rms_norm_bwd_kernel", reads, writes, 0)
    add_norm = ("_rms_norm_bwd_kernel", reads + 4 * N * D, writes + 2 * N * D, 0)
    last_add_norm = ("_rms_norm_bwd_kernel", reads, writes + 2 * N * D, 0)
    dx_sum = ("add", 2 * 4 * N * D, 4 * N * D, 0)  # the embedding's output feeds ln1 and ln2's add
    assert rows(adamw_step, "norm", backward=True) == [add_norm, dw_sum, norm, dw_sum, dx_sum]
    assert rows(adamw_step, "final norm", backward=True) == [last_add_norm, dw_sum]


def test_launches_by_phase_counted_by_hand(adamw_step):
    launches = {}
    for r in adamw_step.records:
        key = bench_step.phase_label(r)
        launches[key] = launches.get(key, 0) + r.launches
    assert launches == {
        "embedding (forward)": 1,
        "norm (forward)": 2,
        # every weight's copy (one multi_tensor_apply launch: 8 tensors of a chunk each), 2 GEMMs, arange, RoPE,
        # attention (no transpose copy)
        "attention (forward)": 1 + 2 + 3,
        "ffn (forward)": 2 + 1,
        "final norm (forward)": 1,
        # count of valid targets (ne, sum), then the chunk: GEMM, CE, dh GEMM, dW GEMM (the first chunk's dW is its
        # product: no zeros); cat and sum the losses; ones_like, the loss's gradient, made by backward() first
        "head + loss (forward)": 9,
        "head + loss (backward)": 2,  # dh and dw scaled (no zero gradients for the op's dh and dw outputs)
        "final norm (backward)": 2,  # the kernel (dx in fp32 and in the branch's bf16), the sum of its dw partials
        # w2, then [W1; W3]: dx and dW GEMMs each, dW written in fp32 (CUDA's fp32-output GEMM: no cast); the SwiGLU
        # kernel writes dg and du side by side, which is the stacked GEMM's gradient as it is
        "ffn (backward)": 2 + 1 + 2,
        # kernel, dw sum each; the engine adds ln1's dx into the residual's gradient
        "norm (backward)": 2 * 2 + 1,
        # output_proj 2; 3 attention kernels writing dq, dk, dv side by side into one buffer; RoPE in place on dq, dk
        # (no zero grad of lse, no cat): that buffer is the stacked GEMM's gradient, for its dx and dW GEMMs
        "attention (backward)": 2 + 3 + 1 + 2,
        "embedding (backward)": 1,
        "clip": 8,  # foreach norm, stack, norm, + eps, reciprocal, mul, clamp, foreach scale
        "optimizer": 4,  # per group: steps + 1 and fused AdamW
    }


def test_weight_gradients_come_out_of_their_gemm_in_fp32(adamw_step):
    # CUDA's fp32-output GEMM (bench.step's stand-in for the fake tensors' CPU): dW = dy^T x written as fp32, read
    # from the bf16 dy and x, and no cast to fp32 after it
    dw = [r for r in adamw_step.records if r.backward and r.op == "mm" and r.phase in ("attention", "ffn")][1::2]
    assert [(r.read, r.written) for r in dw] == [  # backward order; each reads dy and the projection's input
        (2 * N * D + 2 * N * FF, 4 * D * FF),  # w2
        (2 * N * 2 * FF + 2 * N * D, 4 * 2 * FF * D),  # [W1; W3]
        (2 * N * D + 2 * N * D, 4 * D * D),  # output_proj
        (2 * N * 3 * D + 2 * N * D, 4 * 3 * D * D),  # [q; k; v]
    ]
    assert not [r for r in adamw_step.records if r.backward and r.op == "_to_copy"]


def test_flops_are_the_model_accounting_plus_attention_recompute(adamw_step):
    # the accounting counts 2 forward + 4 backward T x T x d products per layer; our backward recomputes QK^T in both
    # passes and dP in the dQ pass: 9 products, so 3 more per layer, each B H T T dh FLOPs (2 x causal half)
    expected = N * flops_per_token(adamw_step.config) + 3 * B * H * T * T * DH
    assert sum(r.flops for r in adamw_step.records) == expected


def test_optimizer_bytes_counted_by_hand(adamw_step):
    matrices = 4 * D * D + 3 * D * FF + 2 * V * D  # decayed group: the blocks' matrices, embedding, lm_head
    gains = 3 * D  # ln1, ln2, ln_final
    fused = [(r.read, r.written, r.launches) for r in adamw_step.records if r.op == "_fused_adamw_"]
    # reads p, g, m, v and the step count; writes p, m, v (all fp32); one multi_tensor_apply launch each
    assert fused == [(16 * matrices + 4 * 9, 12 * matrices, 1), (16 * gains + 4 * 3, 12 * gains, 1)]


def test_views_are_free_and_broadcasts_read_once():
    recorder = bench_step.Recorder()
    with FakeTensorMode():
        x, b = torch.empty(4, 8), torch.empty(8)
        with recorder:
            x.t().reshape(8, 4)
            x + b
    assert [(r.op, r.read, r.written) for r in recorder.records] == [("add", 4 * 32 + 4 * 8, 4 * 32)]


def test_a_gemm_that_adds_a_whole_matrix_into_a_new_output_copies_it_first():
    """CUDA's addmm and baddbmm copy a full-size addend into a new output, then run the GEMM with beta on it: that
    copy is counted; accumulating into the addend itself (out=self) or adding a broadcast bias is not a copy."""
    recorder = bench_step.Recorder()
    with FakeTensorMode():
        c, a, b, bias = torch.empty(16, 8), torch.empty(16, 4), torch.empty(4, 8), torch.empty(8)
        with recorder:
            torch.addmm(c, a, b)
            torch.addmm(c, a, b, out=c)
            torch.addmm(bias, a, b)
    assert [(r.op, r.read, r.written) for r in recorder.records] == [
        ("copy_", 16 * 32, 16 * 32), ("addmm", 16 * 32 + 16 * 16 + 4 * 32, 16 * 32),
        ("addmm", 16 * 32 + 16 * 16 + 4 * 32, 16 * 32), ("addmm", 32 + 16 * 16 + 4 * 32, 16 * 32),
    ]  # fmt: skip


def test_a_cast_that_reaches_the_recorder_as_aten_to_is_counted():
    """Inside our custom ops (below autograd) a cast arrives as aten.to, which torch marks a view (it may return its
    input): a real cast reads its input and writes its output; a no-op ``to`` is free."""
    recorder = bench_step.Recorder()
    with FakeTensorMode():
        x = torch.empty(4, 8)
        cast = torch.empty(4, 8, dtype=torch.bfloat16)
        recorder.count(torch.ops.aten.to.dtype, (x, torch.bfloat16), {}, cast)
        recorder.count(torch.ops.aten.to.dtype, (x, torch.float32), {}, x)
    assert [(r.op, r.read, r.written) for r in recorder.records] == [("_to_copy", 4 * 32, 2 * 32)]


def test_an_op_without_a_rule_fails_loudly():
    with FakeTensorMode():
        x = torch.empty(16)
        with pytest.raises(bench_step.UncountedOp, match="aten.sort"), bench_step.Recorder():
            torch.sort(x)


@triton.jit
def _kernel_without_a_rule(x_ptr):
    pass


def test_a_triton_kernel_without_a_rule_fails_loudly():
    with pytest.raises(bench_step.UncountedOp, match="_kernel_without_a_rule"):
        bench_step.Recorder().triton(_kernel_without_a_rule, (torch.empty(4),), {})


def test_bad_flags_are_one_error_line(capsys):
    assert bench_step.main(["--preset", "nope", "--batch", "1", "--context", "8"]) == 2
    assert bench_step.main(["--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error:" in line for line in err)


def test_muon_step_counted_by_hand():
    """One Muon step pass by pass (train/optim/muon.py argues each one's bytes), so a pass that comes back (a stack
    of fp32 gradients, a cast of the result, a decay pass) fails here."""
    step = bench_step.count_step(CASE, "muon")
    optimizer = [r for r in step.records if r.phase == "optimizer"]
    muon, adamw = optimizer[:-4], optimizer[-4:]
    assert [r.op for r in adamw] == ["_foreach_add_", "_fused_adamw_"] * 2  # per group: step counts, fused update
    # every weight update with its decay: one launch (7 fp32 matrices of one chunk), reading two lists, writing one
    hidden = 4 * D * D + 3 * D * FF
    assert (muon[-1].op, muon[-1].read, muon[-1].written, muon[-1].launches) == (
        "_foreach_lerp_", 8 * hidden, 4 * hidden, 1)  # fmt: skip
    # per iteration shape (k, K): q k v o (64, 64); w2 (64, 192) with w1 and w3 (192 x 64, kept in their layout,
    # last): the look-ahead kernel (kernels/nesterov.py) reads its table of 2 n addresses and through it G and M,
    # writes M and U into the bf16 stack and each tile's fp64 sum of squares (14 bytes an element; tiles of 2048
    # elements); the sums over the tiles; the division by the norms (4); each iteration's a (a s in the last) on P's
    # diagonal, then P X into the fp32 updates: one GEMM for the wide matrices, one for the tall ones; making P = b
    # G + c G^2 copies the Gram matrix G into P's buffer first, as CUDA's baddbmm does
    starts = [i for i, r in enumerate(muon) if r.op == "_nesterov_kernel"] + [len(muon) - 1]
    for (n, tall, k, K), a, b in zip([(4, 0, D, D), (3, 2, D, FF)], starts[:-1], starts[1:], strict=True):
        rs, e, tiles = muon[a:b], n * k * K, n * k * K // 2048  # the stack's elements, its matrices' tiles
        assert [(r.op, r.read, r.written) for r in rs if not r.matmul] == [
            ("_nesterov_kernel", 16 * n + 8 * e, 6 * e + 8 * tiles), ("sum", 8 * tiles, 8 * n),
            ("_divide_by_norm_kernel", 2 * e + 8 * n, 2 * e),
            *[("copy_", 2 * n * k * k, 2 * n * k * k), ("add_", 2 * n * k, 2 * n * k)] * 5
        ]  # fmt: skip
        parts = [p for p in (n - tall, tall) if p]
        last = [(r.op, r.read, r.written) for r in rs[-len(parts) :]]
        assert last == [("bmm", 2 * p * k * k + 2 * p * k * K, 4 * p * k * K) for p in parts]
        # 3 GEMMs an iteration; the first one's Gram matrix and update and the last product, one per layout
        assert sum(r.launches for r in rs if r.matmul) == 5 * 3 + 3 * (len(parts) - 1)
    assert sum(r.launches for r in muon) == 1 + (3 + 15 + 5 + 5) + (3 + 18 + 5 + 5)
    # no GEMM adds into its output (CUDA's baddbmm copies its addend there first) but the one making P from G
    assert [r.op for r in muon if r.op == "baddbmm"] == ["baddbmm"] * 10
    # Newton-Schulz: 4 k^2 K + 2 k^3 per matrix and iteration (k = min(m, n), K = max) in bf16, as on CUDA
    ns = 5 * (4 * (4 * D * D * D + 2 * D**3) + 3 * (4 * D * D * FF + 2 * D**3))
    assert sum(r.flops for r in optimizer) == ns
    assert {r.op for r in optimizer if r.matmul} == {"bmm", "baddbmm"}


def test_foreach_copy_counted_by_hand():
    """The weight cache's refresh: multi_tensor_apply over (source, destination) lists holds 64 tensors and 320
    chunks of 65,536 elements a launch; the destination is written, not read."""
    recorder = bench_step.Recorder()
    with FakeTensorMode():
        small = [torch.empty(8, 8) for _ in range(100)]  # 100 tensors of one chunk: 64, then 36
        large = [torch.empty(321, 65536)]  # 321 chunks: 320, then 1
        with recorder:
            for srcs in (small, large):
                torch._foreach_copy_([torch.empty(s.shape, dtype=torch.bfloat16) for s in srcs], srcs)
    assert [(r.op, r.read, r.written, r.launches) for r in recorder.records] == [
        ("_foreach_copy_", 4 * 6400, 2 * 6400, 2),
        ("_foreach_copy_", 4 * 321 * 65536, 2 * 321 * 65536, 2),
    ]
