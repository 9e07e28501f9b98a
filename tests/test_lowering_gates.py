"""Static Hopper gates: properties of the code an H100 would run, read from sm_90a compiles in CI
(kernels.tooling.lowering).

Each op is launched through its own launcher on CPU stand-in tensors at the shapes training uses (the TinyStories-17M
and 125M presets at bench.kernels' batches; attention at bench.attention's T = 4096 for head dims 32, 64 and 128,
and the 17M preset), with the argument specialization a GPU launch gets, and every autotune config its pruner keeps
is compiled. (The 125M preset's attention differs from the d = 64 case only in its head count, 12, not a multiple
of 16; `python -m smollm_stack.bench.lowering` reports it.) A change that regresses one of these properties fails here,
before any GPU sees it:

- attention: every tl.dot of the forward, dK/dV and dQ kernels is a wgmma (none falls back to mma.sync, which runs
  Hopper's tensor cores at a fraction of their rate), at head dims 32, 64 and 128; the dK/dV kernel's are full
  width (N >= 64, no m64n32k16) at head dim 64;
- RoPE's grid puts at least one full wave on the H100's SMs at the 125M shape;
- memory-bound kernels: at least 3/4 of the bytes each moves go in 16-byte vector loads and stores (only per-row scalars
  may go narrower), add_rms_norm's as a pre-norm block runs it (with the sum's gradient, and without for the last norm),
  including the odd vocabulary V = 50257, standalone and in FLCE's padded buffer, and Muon's look-ahead kernel
  (kernels/nesterov.py), whose matrices' addresses come from a table. Counted are the loads of the kernel's
  tensors: kernels.tooling.lowering counts those of constant arrays compiled into the module apart (RoPE's libdevice
  sinf/cosf read the 2/pi bits of their large-argument reduction, scalar by scalar, only for |angle| > 105615 rad, i.e.
  positions past 105615), and only where their address provably starts at such an array;
- no kernel spills registers (STL/LDL in the SASS) at these shapes. The STL/LDL of a local array the PTX declares
  itself (the digits of that same reduction, which Triton 3.6's ptxas 12.8 keeps in local memory) count only if
  `ptxas -v` on the PTX also reports a spill.
"""

import pytest

ATTENTION_SCRIPT = """
import torch
from smollm_stack.kernels import attention as A

BF16 = torch.bfloat16


def forward(B, H, T, d):
    x = torch.empty(B, H, T, d, dtype=BF16)
    return lambda: A._forward(x, x, x, True, d ** -0.5)


def backward(B, H, T, d):
    x, lse = torch.empty(B, H, T, d, dtype=BF16), torch.empty(B, H, T)
    return lambda: A._backward(x, x, x, x, x, lse, True, d ** -0.5)


SHAPES = {f"d{d} T4096": (16384 // 4096, 2048 // d, 4096, d) for d in (32, 64, 128)}
SHAPES["tinystories-17m"] = (128, 16, 256, 32)
CASES = {f"{name} {pass_}": make(*shape) for name, shape in SHAPES.items()
         for pass_, make in (("forward", forward), ("backward", backward))}
"""

# Attention masked across documents (doc_ids): the DOCS=True variants of the same kernels at the T = 4096 shapes.
DOC_ATTENTION_SCRIPT = """
import torch
from smollm_stack.kernels import attention as A

BF16 = torch.bfloat16


def forward(B, H, T, d):
    x, starts = torch.empty(B, H, T, d, dtype=BF16), torch.empty(B, T, dtype=torch.int32)
    return lambda: A._forward(x, x, x, True, d ** -0.5, starts)


def backward(B, H, T, d):
    x, lse, bounds = torch.empty(B, H, T, d, dtype=BF16), torch.empty(B, H, T), torch.empty(B, T, dtype=torch.int32)
    return lambda: A._backward(x, x, x, x, x, lse, True, d ** -0.5, bounds, bounds)


CASES = {f"d{d} T4096 docs {pass_}": make(16384 // 4096, 2048 // d, 4096, d) for d in (32, 64, 128)
         for pass_, make in (("forward", forward), ("backward", backward))}
"""

# The one-pass backward with an atomic dQ (SMOLLM_ATTENTION_BWD=atomic) at T = 4096; with documents at head dim 32,
# and at 128, where it spills and the launcher runs the two-pass backward instead.
ATOMIC_ATTENTION_SCRIPT = """
import torch
from smollm_stack.kernels import attention as A


def backward(B, H, T, d, docs):
    x, lse = torch.empty(B, H, T, d, dtype=torch.bfloat16), torch.empty(B, H, T)
    bounds = torch.empty(B, T, dtype=torch.int32) if docs else None
    return lambda: A._backward(x, x, x, x, x, lse, True, d ** -0.5, bounds, bounds, atomic=True)


CASES = {f"d{d} T4096{' docs' * docs} atomic backward": backward(16384 // 4096, 2048 // d, 4096, d, docs)
         for d, docs in ((32, False), (64, False), (128, False), (32, True), (128, True))}
"""

MEMORY_BOUND_SCRIPT = """
import torch
from smollm_stack import kernels
from smollm_stack.kernels.linear_cross_entropy import chunk_rows, cross_entropy_forward, padded_width
from smollm_stack.kernels.nesterov import divide_by_norm_, nesterov_
from smollm_stack.kernels.rope import apply_rope_qk

BF16 = torch.bfloat16
PRESETS = {"tinystories-17m": dict(tokens=128 * 256, d_model=512, d_ff=1344, heads=16, vocab=10000, seq=256),
           "125m": dict(tokens=16 * 1024, d_model=768, d_ff=2048, heads=12, vocab=50257, seq=1024)}


def leaf(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype).requires_grad_()


def fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.empty_like(out) if out.dim() else None)
    return run


def add_norm(N, d, h_used=True):
    # autocast's pre-norm block add: fp32 stream and bf16 branch in, fp32 sum and bf16 norm out; the sum's gradient
    # flows in from its later uses (h_used), or not (the last norm)
    x, r, w = leaf(N, d, dtype=torch.float32), leaf(N, d), leaf(d, dtype=torch.float32)

    def run():
        h, y = kernels.add_rms_norm(x, r, w, out_dtype=BF16)
        outs = [h, y] if h_used else [y]
        torch.autograd.backward(outs, [torch.empty_like(t) for t in outs])
    return run


def flce_chunk(tokens, vocab):
    rows = chunk_rows(tokens, vocab, BF16)
    logits = torch.empty(rows, padded_width(vocab), dtype=BF16)[:, :vocab]  # FLCE's padded buffer
    targets = torch.zeros(rows, dtype=torch.int64)
    return lambda: cross_entropy_forward(logits, targets, torch.tensor(rows), -100, logits)


CASES = {}
for name, p in PRESETS.items():
    N, T = p["tokens"], p["seq"]
    CASES.update({
        f"rms_norm {name}": fwd_bwd(kernels.rms_norm, leaf(N, p["d_model"]), leaf(p["d_model"], dtype=torch.float32)),
        f"swiglu {name}": fwd_bwd(kernels.swiglu, leaf(N, p["d_ff"]), leaf(N, p["d_ff"])),
        # what training runs: W1 x and W3 x, the halves of one stacked GEMM's output, read in place
        f"swiglu halves {name}": fwd_bwd(lambda h, n=p["d_ff"]: kernels.swiglu(*h.split(n, -1)),
                                         leaf(N, 2 * p["d_ff"])),
        f"rope {name}": fwd_bwd(kernels.apply_rope, leaf(N // T, p["heads"], T, p["d_model"] // p["heads"]),
                                torch.arange(T)),
        # what training runs: autocast's fp32 residual into a bf16 norm, and q and k rotated in one launch
        f"rms_norm fp32-to-bf16 {name}": fwd_bwd(lambda x, w: kernels.rms_norm(x, w, out_dtype=BF16),
                                                 leaf(N, p["d_model"], dtype=torch.float32),
                                                 leaf(p["d_model"], dtype=torch.float32)),
        f"add_rms_norm {name}": add_norm(N, p["d_model"]),
        f"add_rms_norm last {name}": add_norm(N, p["d_model"], h_used=False),
        f"rope qk {name}": fwd_bwd(lambda q, k, pos=torch.arange(T): torch.cat([y.flatten() for y in
                                                                                apply_rope_qk(q, k, pos)]),
                                   *[leaf(N // T, T, p["heads"], p["d_model"] // p["heads"]).transpose(1, 2)
                                     for _ in range(2)]),  # (B, H, T, d) views of the projections, as the model
        f"cross_entropy {name}": fwd_bwd(kernels.cross_entropy, leaf(N, p["vocab"]), torch.zeros(N, dtype=torch.int64)),
        f"flce_chunk {name}": flce_chunk(N, p["vocab"]),
    })


def nesterov_stack(batch, k, K, dtype=torch.bfloat16):
    # Muon's look-ahead into its bf16 stack (bf16 on every card, not BF16's stand-in; fp32 in tests), then the
    # division by each matrix's norm
    x, ssq, grads = torch.empty(batch, k, K, dtype=dtype), torch.empty(batch, dtype=torch.float64), torch.empty(k, K)
    return lambda: divide_by_norm_(x, nesterov_([grads] * batch, [grads] * batch, x, ssq, 0.95))


CASES.update({"nesterov 125m attention": nesterov_stack(48, 768, 768),
              "nesterov 125m ffn": nesterov_stack(36, 768, 2048),
              "nesterov fp32": nesterov_stack(4, 512, 512, torch.float32)})
"""

ATTENTION_KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
WGMMA_KERNELS = (*ATTENTION_KERNELS, "_attn_bwd_atomic")
MEMORY_BOUND_OPS = ("rms_norm", "add_rms_norm", "swiglu", "rope", "cross_entropy", "flce_chunk", "nesterov")


def _describe(r: dict) -> str:
    blocks = {k: v for k, v in r["config"].items() if k.startswith("BLOCK") or k.startswith("num_")}
    return f"{r['name']} {blocks}"


@pytest.fixture(scope="module")
def attention_launches(compile_for_gpu):
    return compile_for_gpu(ATTENTION_SCRIPT)


@pytest.fixture(scope="module")
def doc_attention_launches(compile_for_gpu):
    return compile_for_gpu(DOC_ATTENTION_SCRIPT)


@pytest.fixture(scope="module")
def atomic_attention_launches(compile_for_gpu):
    return compile_for_gpu(ATOMIC_ATTENTION_SCRIPT)


@pytest.fixture(scope="module")
def memory_bound_launches(compile_for_gpu):
    return compile_for_gpu(MEMORY_BOUND_SCRIPT)


def _problems(records: list[dict], label: str, check) -> list[str]:
    return [f"{label}: {_describe(r)}: {why}" for r in records if (why := check(r))]


def _no_spills(r: dict) -> str | None:
    if r["error"]:
        return r["error"].splitlines()[0]
    if r["spill_stores"] or r["spill_loads"]:
        return f"{r['spill_stores']} spill stores, {r['spill_loads']} spill loads"
    return None


def _wgmma_without_spills(r: dict) -> str | None:
    if r["name"] in WGMMA_KERNELS and (r["mma_sync"] or not r["wgmma"]):
        return f"{r['wgmma']} wgmma, {r['mma_sync']} mma.sync"
    return _no_spills(r)


def _vectors(r: dict) -> str | None:
    if r["ld16"] < 0.75 or r["st16"] < 0.75:
        return f"16-byte share of bytes: loads {r['ld16']:.0%} {r['loads']}, stores {r['st16']:.0%} {r['stores']}"
    return _no_spills(r)


def test_attention_dots_are_wgmma_without_spills(attention_launches):
    problems = []
    for label, records in attention_launches.items():
        wanted = ATTENTION_KERNELS[:1] if label.endswith("forward") else ATTENTION_KERNELS[1:]
        assert {r["name"] for r in records} >= set(wanted), label
        problems += _problems(records, label, _wgmma_without_spills)
    assert not problems, "\n".join(problems)


def test_dkdv_wgmma_are_full_width(attention_launches):
    """Every kept dK/dV config issues wgmma of N >= 64 at head dim 64: N is BLOCK_M for S^T = K Q^T and dP^T = V dO^T
    and the head dim for dV and dK, and Hopper runs m64n32k16 far below its peak. Not yet at head dim 128, where every
    BLOCK_M = 64 candidate spills (kernels.attention.Tuning): the kept 32-row configs issue 48 n32 wgmma of 60."""
    records = [r for r in attention_launches["d64 T4096 backward"] if r["name"] == "_attn_bwd_dkdv"]
    assert records
    problems = [f"{_describe(r)}: wgmma by N {r['wgmma_n']}" for r in records
                if not r["wgmma_n"] or min(map(int, r["wgmma_n"])) < 64]  # fmt: skip
    assert not problems, "\n".join(problems)


def test_document_masked_attention_dots_are_wgmma_without_spills(doc_attention_launches):
    problems = []
    for label, records in doc_attention_launches.items():
        wanted = ATTENTION_KERNELS[:1] if label.endswith("forward") else ATTENTION_KERNELS[1:]
        assert {r["name"] for r in records} >= set(wanted), label
        assert all(r["config"]["DOCS"] for r in records if r["name"] in wanted), label
        problems += _problems(records, label, _wgmma_without_spills)
    assert not problems, "\n".join(problems)


def test_atomic_backward_dots_are_wgmma_without_spills(atomic_attention_launches):
    problems = []
    for label, records in atomic_attention_launches.items():
        wanted = ATTENTION_KERNELS[1:] if label.startswith("d128 T4096 docs") else ("_attn_bwd_atomic",)
        assert {r["name"] for r in records} == {"_attn_bwd_delta", *wanted}, label
        assert all(r["config"]["DOCS"] == ("docs" in label) for r in records if r["name"] in wanted), label
        problems += _problems(records, label, _wgmma_without_spills)
    assert not problems, "\n".join(problems)


def test_atomic_backward_wgmma_no_narrower_than_the_default(attention_launches, atomic_attention_launches):
    """No wgmma narrower than N = 64 at a head dim where the two-pass dK/dV kernel, whose loop the atomic kernel
    extends, issues none (64; at 32 its dV and dK are n32 by the head dim, at 128 its kept 32-row tiles are n32)."""
    narrowest = lambda records: min((int(n) for r in records for n in r["wgmma_n"]), default=0)  # noqa: E731
    problems = []
    for d in (32, 64, 128):
        default = narrowest(r for r in attention_launches[f"d{d} T4096 backward"] if r["name"] == "_attn_bwd_dkdv")
        problems += [f"d{d}: {_describe(r)}: wgmma by N {r['wgmma_n']}, dK/dV's narrowest {default}"
                     for r in atomic_attention_launches[f"d{d} T4096 atomic backward"]
                     if r["name"] == "_attn_bwd_atomic" and narrowest([r]) < min(default, 64)]  # fmt: skip
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("op", MEMORY_BOUND_OPS)
def test_memory_bound_kernels_move_data_in_16_byte_vectors(memory_bound_launches, op):
    problems = []
    for label, records in memory_bound_launches.items():
        if label.split()[0] == op:
            assert records, label
            problems += _problems(records, label, _vectors)
    assert not problems, "\n".join(problems)


H100_L2_BYTES = 50 * 2**20


def test_cross_entropy_rows_in_flight(memory_bound_launches):
    """Cross-entropy's loop path (125M, V = 50257) reads each row twice: the rows all SMs hold at once (a row per
    resident CTA, 132 SMs) must take at most half the H100's 50 MB L2, the other half for the gradient rows being
    written, so the second sweep reads L2, not HBM. The one-tile path (17M, V = 10000) reads a row once but must
    keep two or more CTAs on each SM, so one row's loads overlap another's reductions and stores."""
    paths, problems = set(), []
    for preset, vocab in (("125m", 50257), ("tinystories-17m", 10000)):
        for label in (f"cross_entropy {preset}", f"flce_chunk {preset}"):
            for r in memory_bound_launches[label]:
                if r["name"] != "_cross_entropy_kernel":
                    continue
                single_tile = bool(r["config"].get("SINGLE_TILE"))
                paths.add((preset, single_tile))
                in_flight = 132 * r["resident_ctas"] * vocab * 2
                if single_tile and r["resident_ctas"] < 2:
                    problems.append(f"{label}: {_describe(r)}: {r['resident_ctas']} CTA per SM")
                elif not single_tile and in_flight > H100_L2_BYTES // 2:
                    problems.append(f"{label}: {_describe(r)}: {in_flight / 1e6:.0f} MB of rows in flight")
    assert paths == {("125m", False), ("tinystories-17m", True)}, paths
    assert not problems, "\n".join(problems)


def test_rope_fills_the_gpu_at_125m(memory_bound_launches):
    """RoPE's grid (kernels/rope.py: head groups on its third axis) puts at least one full wave on the 132 SMs."""
    records = memory_bound_launches["rope qk 125m"]
    assert records and all(r["waves"] >= 1 for r in records), [(r["grid"], r["waves"]) for r in records]


def test_memory_bound_kernels_do_not_spill(memory_bound_launches):
    problems = []
    for label, records in memory_bound_launches.items():
        problems += _problems(records, label, _no_spills)
    assert not problems, "\n".join(problems)


# A kernel made to spill: one warp holds a 128 x 128 fp32 tile (512 values a thread, over the 255-register limit)
# live until its column sums are known.
SPILL_SCRIPT = """
import torch
import triton
import triton.language as tl


@triton.jit
def centre_columns(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
    tl.store(Y + offs[:, None] * BLOCK + offs[None, :], x - tl.sum(x, axis=0)[None, :] / BLOCK)


x = torch.empty(128, 128)
CASES = {"spill": lambda: centre_columns[(1,)](x, x, BLOCK=128, num_warps=1),
         "no spill": lambda: centre_columns[(1,)](x, x, BLOCK=16, num_warps=1)}
"""


def test_the_gates_see_a_spill(compile_for_gpu):
    """The spill counts the gates read are real: STL/LDL in a kernel that must spill, none in one that fits."""
    launches = compile_for_gpu(SPILL_SCRIPT)
    (spilled,), (fits,) = launches["spill"], launches["no spill"]
    assert spilled["stack"] > 0 and spilled["spill_stores"] > 0 and spilled["spill_loads"] > 0, spilled
    assert "spill stores" in _no_spills(spilled)
    assert fits["stack"] == fits["spill_stores"] == fits["spill_loads"] == 0 and _no_spills(fits) is None, fits


# A kernel's PTX in miniature: a libdevice-style table walked by a scalar loop, a tensor, and two loads that must stay
# the kernel's (an address mixing the table with a parameter, and one of unknown origin).
TABLE_PTX = """
.global .align 4 .b8 __cudart_i2opi_f[24] = {65, 144, 67, 60, 153, 149, 98, 219};
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0
)
{
	ld.param.b64 	%rd1, [k_param_0];
	mov.b64 	%rd9, 0;
	mov.b64 	%rd2, __cudart_i2opi_f;
$L__BB0_1:
	add.s64 	%rd3, %rd2, %rd9;
	ld.global.nc.b32 	%r1, [%rd3];
	add.s64 	%rd9, %rd9, 4;
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd1 + 0 ];
	add.s64 	%rd4, %rd2, %rd1;
	ld.global.b32 	%r6, [%rd4];
	ld.global.b16 	%rs1, [%rd7];
	st.global.v4.b32 	[ %rd1 + 0 ], { %r2, %r3, %r4, %r5 };
}
"""


def test_table_loads_are_told_apart_only_when_their_address_starts_at_a_module_array():
    from smollm_stack.kernels.tooling import lowering

    loads, stores, table_loads = lowering._access_widths(TABLE_PTX)
    assert (dict(loads), dict(stores), dict(table_loads)) == ({16: 1, 4: 1, 2: 1}, {16: 1}, {4: 1})
