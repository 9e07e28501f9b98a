"""Count one whole training step on the CPU: every kernel launch, its HBM bytes and FLOPs, and an H100 roofline.

    python -m smollm_stack.bench.step                      # 17M at 128 x 256 and 125M at 16 x 1024, Muon and AdamW
    python -m smollm_stack.bench.step --preset 125m --batch 16 --context 1024 --optimizer muon
    python -m smollm_stack.bench.step --dry-run            # a tiny model: the plumbing
    SMOLLM_ATTENTION_BWD=atomic python -m smollm_stack.bench.step ...   # attention's one-pass atomic-dQ backward

The step is the trainer's (train/loop.py): forward under bf16 autocast, backward, clip_gradients, the optimizer of
``--optimizer`` (train/optim/builder.py's build_optimizer) and zero_grad, on the Triton kernels. No tensor holds data:
the model lives in ``FakeTensorMode`` and a ``TorchDispatchMode`` records every aten op and, inside our custom ops
(whose Python bodies it runs), every Triton launch, which it records instead of running. The second of two steps is
counted, so lazily built optimizer state and cast caches are as in a long run.

What one record costs, by kind of op:
- views, allocations and metadata: nothing (no launch, no bytes);
- an aten kernel: one launch; it reads each tensor input once and writes each output (and each argument it mutates)
  once, counting the distinct elements of a view (a broadcast dimension is read once); the embedding lookup reads
  only the rows it gathers; ``copy_``/``_foreach_copy_``/``fill_``/``zero_`` do not read their destination;
- foreach and fused-optimizer ops: the launches of CUDA's multi_tensor_apply (at most MTA_MAX_TENSORS tensors and
  MTA_MAX_BLOCKS chunks of MTA_CHUNK elements a launch), the same bytes rule;
- a Triton kernel: one launch; TRITON_KERNELS names the arguments it writes (and updates in place); it reads every
  other tensor argument once and writes those once: compulsory traffic, as if the caches held every reuse; one that
  reaches tensors through a table of their addresses (POINTER_TABLES) moves those tensors too, by its rule there;
- matmuls: 2 m n k FLOPs per product (mm, addmm, bmm, baddbmm); an addmm or baddbmm adding a full-size matrix
  into a new output first copies it there (as CUDA does: a ``copy_`` record), not one accumulating in place or
  adding a broadcast bias; attention kernels 2 B H T S d per T x S x d product
  (TRITON_KERNELS counts them: 2 forward, 4 in the dK/dV pass, 3 in the dQ pass, 5 in the one-pass backward with an
  atomic dQ, whose atomic adds count as one read and one write of the fp32 dQ), halved when causal.
Any other aten op, or a Triton kernel missing from TRITON_KERNELS, stops the count with UncountedOp: a new op needs
its rule here before its bytes can be trusted.

Phases: forward ops take the phase of the innermost module running them (embedding; per layer norm, attention, ffn,
and the block's own residual adds; final norm; head + loss for the fused lm_head and loss); backward ops take the
phase of the autograd node running them (tagged with its module's phase in the forward); then clip, optimizer,
zero_grad. Matmul launches (GEMMs, Newton-Schulz, the attention kernels) are "matmul"; everything else is "other".

The H100 it predicts for (assumptions, none measured here): H100 SXM, bf16 dense tensor-core peak PEAK_FLOPS
(989 TFLOP/s), of which matmuls sustain MATMUL_EFFICIENCY; HBM3 at COPY_BANDWIDTH (a large device copy's rate,
~90% of the 3.35 TB/s peak); each launch costs max(bytes / COPY_BANDWIDTH, FLOPs / (PEAK_FLOPS x
MATMUL_EFFICIENCY)) plus LAUNCH_OVERHEAD_S of idle GPU between kernels; no overlap between launches, no L2 reuse
across launches. MFU is model FLOPs (model.accounting.flops_per_token) over PEAK_FLOPS, as the trainer reports it.
The baseline: llm.c's GPT-2 124M on 8 H100s, 139 ms per 524,288-token step, LLMC_TOKENS_PER_S per GPU.

Stand-ins for CUDA (the fake tensors live on the CPU, since autograd needs a real device type): autocast is the
CPU's bf16 autocast (the same casts for linear and matmuls); the fused loss's fp32 dW accumulates in place in one
fp32-output addmm, the projections' dW comes out of one fp32-output GEMM, and Muon fills its stacks with its Triton
look-ahead kernel and iterates in bf16 (its last GEMM writing fp32), as on CUDA; persistent launchers size their
grids for Triton's interpreter (a handful of programs, which changes only the rms_norm backward's small dw partial
sums).

The fused minimum: the bytes a step must move if every elementwise op (norms, RoPE, SwiGLU, residual adds, casts,
the loss over the logits, gradient sums) rode inside a GEMM's or attention kernel's prologue or epilogue: the
matmul launches' own bytes as counted, the embedding's gather and scatter as the eager count has them (``--compile``
keeps the eager minimum), and an optimizer that reads each gradient once for the clipping norm and then once more
with the parameter and its state, writing both back and a bf16 copy of each matrix (AdamW: 4 + 28 + 2 bytes a
parameter; Muon: 4 + 20 + 2).

``--compile``: the step with the model under ``torch.compile(fullgraph=True)`` (Inductor), as the trainer's compile
flag runs it, with the same CUDA stand-ins. Inductor compiles the case's forward and, up front rather than at the
first backward, its backward, each through all its graph passes to its scheduler, and stops there: no code is
generated and nothing runs (the model holds real but unset weights, of which Dynamo traces fakes; no size is too
large). The scheduler, after fusion, says which kernels it would launch. Each fused pointwise/reduction kernel is one
launch whose bytes are the scheduler's own ``get_read_buffer_sizes`` and ``get_write_buffer_sizes`` (each buffer it
reads or writes once); matmuls (CUDA's fp32-output GEMM too, which Inductor lowers for CUDA only: here an opaque
call) and our custom ops stay opaque calls in Inductor's graph, so their records are the eager count's (everything
launched inside a custom op's body, the weight cache's casts included); Inductor's own fallbacks to aten are one
launch with the same bytes rule; clip, optimizer and zero_grad stay eager, as the trainer compiles only the model.
Assumptions: the CPU scheduler's fusion decisions stand for CUDA's (the same scheduler, but C++ codegen may recompute
a pointwise producer inside a reduction where Triton would fuse the two); compiled glue has no module, so its phase
is "compiled glue".
"""

import argparse
import contextlib
import functools
import importlib
import inspect
import math
import sys
import unittest.mock
import warnings
from collections import defaultdict
from dataclasses import dataclass

from smollm_stack.bench import env  # first: it sets what torch and triton read when they load
import torch
import triton.runtime.jit
from torch._inductor import ir, lowering, scheduler
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from smollm_stack.bench import cli
from smollm_stack.bench.train import GPU_CASES, BenchCase
from smollm_stack.kernels import _utils as kernel_utils
from smollm_stack.kernels import linear_cross_entropy as flce
from smollm_stack.kernels import rope
from smollm_stack.kernels.weight_cache import clear_weight_cache
from smollm_stack.model import ModelConfig, TransformerLM
from smollm_stack.model.accounting import flops_per_token
from smollm_stack.model.config import PRESETS
from smollm_stack.train.optim import muon
from smollm_stack.train.config import TrainConfig
from smollm_stack.train.optim.adamw import clip_gradients
from smollm_stack.train.optim.builder import build_optimizer

PEAK_FLOPS = 989e12  # H100 SXM, bf16 dense tensor cores
MATMUL_EFFICIENCY = 0.7  # of PEAK_FLOPS, what cuBLAS and our attention sustain at these shapes (assumed)
COPY_BANDWIDTH = 3.0e12  # bytes/s, H100 SXM HBM3 as a large copy reaches it
LAUNCH_OVERHEAD_S = 3e-6  # idle GPU between two dependent kernels launched from Python (assumed)
LLMC_TOKENS_PER_S = 471_000  # llm.c GPT-2 124M, 8 x H100: 524,288 tokens in 139 ms, per GPU
# CUDA's multi_tensor_apply (foreach and fused optimizers): tensors per launch by the number of tensor lists
MTA_MAX_TENSORS = (110, 64, 48, 36, 30)
MTA_MAX_BLOCKS, MTA_CHUNK = 320, 65536

# Triton kernels: (T x S x d products, arguments written, arguments read and written)
TRITON_KERNELS = {
    "_attn_fwd": (2, ("Out", "LSE"), ()),
    "_attn_bwd_delta": (0, ("DELTA", "DQ"), ()),
    "_attn_bwd_dkdv": (4, ("DK", "DV"), ()),
    "_attn_bwd_dq": (3, ("DQ",), ()),
    "_attn_bwd_atomic": (5, ("DK", "DV"), ("DQ",)),  # SMOLLM_ATTENTION_BWD=atomic: DQ is the fp32 sum, updated
    "_cross_entropy_kernel": (0, ("grad_ptr", "loss_ptr"), ()),
    "_scale_kernel": (0, (), ("x_ptr",)),
    "_rms_norm_fwd_kernel": (0, ("h_ptr", "y_ptr", "rstd_ptr"), ()),
    "_rms_norm_bwd_kernel": (0, ("dx_ptr", "dr_ptr", "dw_partial_ptr"), ()),
    "_rope_kernel": (0, ("qo_ptr", "ko_ptr"), ()),
    "_swiglu_fwd_kernel": (0, ("y_ptr",), ()),
    "_swiglu_bwd_kernel": (0, ("dg_ptr", "du_ptr"), ()),
    "_nesterov_kernel": (0, ("x_ptr", "partial_ptr"), ()),  # and the matrices of its table: POINTER_TABLES
    "_divide_by_norm_kernel": (0, (), ("x_ptr",)),
}
# Triton kernels that reach tensors through a table of their addresses: (the table, the argument giving each
# tensor's elements, (bytes an element read, written) for the tensors of each row of the table)
POINTER_TABLES = {"_nesterov_kernel": ("table_ptr", "n", ((4, 0), (4, 4)))}  # fp32 gradients; momenta, updated
MATMULS = {"mm": ("self", "mat2"), "addmm": ("mat1", "mat2"), "bmm": ("self", "mat2"), "baddbmm": ("batch1", "batch2")}
FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "alias", "lift_fresh",
        "_unsafe_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
        "promote_types"}  # fmt: skip
WRITE_ONLY = {"copy_", "fill_", "zero_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
              "scalar_tensor", "_foreach_copy_"}  # fmt: skip
STREAMING = WRITE_ONLY | {"sum", "mean", "amax", "amin", "linalg_vector_norm", "norm", "_to_copy", "clone", "cat",
                          "stack", "embedding_dense_backward", "_fused_adamw_", "_fused_adam_", "arange"}  # fmt: skip
# Ops that mark an argument mutable but only read it (the fused optimizers' grads)
READ_ONLY_MUTABLE = {"_fused_adamw_": ("grads", "max_exp_avg_sqs"), "_fused_adam_": ("grads", "max_exp_avg_sqs")}
LAYER_PHASES = ("norm", "attention", "ffn", "residual")
STEP_PHASES = ("clip", "optimizer", "zero_grad")  # after the backward


class UncountedOp(RuntimeError):
    """An op the tool has no rule for: its bytes would be a guess."""


@dataclass
class Record:
    op: str
    phase: str
    backward: bool
    read: int
    written: int
    flops: float = 0.0
    launches: int = 1
    matmul: bool = False
    in_custom_op: bool = False  # launched inside one of our custom ops (--compile keeps these)


def nbytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view covers (a broadcast, stride-0 dimension counts once)."""
    return math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) * t.element_size()


def view_key(t: torch.Tensor) -> tuple:
    return StorageWeakRef(t.untyped_storage()), t.storage_offset(), tuple(t.shape), tuple(t.stride())


def total_bytes(tensors) -> int:
    """Bytes of each distinct view once."""
    seen = {view_key(t): nbytes(t) for t in tensors}
    return sum(seen.values())


def phase_of(module_name: str) -> str:
    """The phase of the ops a module runs itself, from its qualified name in TransformerLM."""
    parts = module_name.split(".")
    if parts[0] in ("token_embeddings", "value_embeddings"):
        return "embedding"
    if parts[0] == "layers":
        sub = parts[2] if len(parts) > 2 else ""
        return {"ln1": "norm", "ln2": "norm", "attn": "attention", "ffn": "ffn"}.get(sub, "residual")
    return "final norm" if parts[0] == "ln_final" else "head + loss"


def mta_launches(lists: list[list[torch.Tensor]]) -> int:
    """Launches of CUDA's multi_tensor_apply over tensor lists of equal length."""
    depth = min(len(lists), len(MTA_MAX_TENSORS))
    chunks = sum(math.ceil(t.numel() / MTA_CHUNK) for t in lists[0])
    return max(1, math.ceil(len(lists[0]) / MTA_MAX_TENSORS[depth - 1]), math.ceil(chunks / MTA_MAX_BLOCKS))


class Recorder(TorchDispatchMode):
    """Records a Record for every kernel an op under it would launch (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.records: list[Record] = []
        self.modules: list[str] = []  # the forward's module stack
        self.phase: str | None = None  # set outside the model: clip, optimizer, zero_grad
        self.custom_ops = 0  # how deep in our custom ops' bodies

    def where(self) -> tuple[str, bool]:
        if self.phase is not None:
            return self.phase, False
        node = torch._C._current_autograd_node()
        if node is not None:
            return node.metadata.get("phase", "head + loss"), True
        return phase_of(self.modules[-1]) if self.modules else "head + loss", False

    def add(self, op: str, read: int, written: int, flops: float = 0.0, launches: int = 1, matmul: bool = False):
        phase, backward = self.where()
        self.records.append(Record(op, phase, backward, read, written, flops, launches, matmul, self.custom_ops > 0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "smollm_stack":  # our custom op: run its body, so its launches are counted
            self.custom_ops += 1
            try:
                with self:
                    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            finally:
                self.custom_ops -= 1
        out = func(*args, **kwargs)
        self.count(func, args, kwargs, out)
        return out

    def count(self, func, args, kwargs, out):
        name = func.overloadpacket.__name__
        if name == "to" and out is not args[0]:  # a cast inside our ops: aten.to may alias, so it is marked a view
            self.add("_to_copy", total_bytes([args[0]]), total_bytes([out]))
            return
        if func.namespace in ("prim", "profiler") or func.is_view or name in FREE:
            return
        streaming = torch.Tag.pointwise in func.tags or name in STREAMING or name.startswith("_foreach_")
        if not (streaming or name in MATMULS or name == "embedding"):
            raise UncountedOp(f"bench.step has no rule for {func}: add one before trusting its bytes")
        read, written, lists = [], [], []
        bound = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        for arg in func._schema.arguments:
            value = bound.get(arg.name)
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            if isinstance(value, (list, tuple)) and tensors:
                lists.append(tensors)
            mutable = arg.alias_info is not None and arg.alias_info.is_write
            if mutable and arg.name not in READ_ONLY_MUTABLE.get(name, ()):
                written += tensors
            if not arg.is_out and not (mutable and name in WRITE_ONLY):
                read += tensors
        written += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        read_bytes = total_bytes(read)
        if name == "embedding":  # reads the rows it gathers, not the table
            read_bytes = total_bytes(read[1:]) + total_bytes(written)
        flops = matmul_flops(*(bound[n] for n in MATMULS[name])) if name in MATMULS else 0.0
        addend = bound.get("self") if name in ("addmm", "baddbmm") else None
        if addend is not None and addend.numel() == out.numel() and bound.get("beta", 1) != 0 and addend is not out:
            self.add("copy_", nbytes(addend), nbytes(out))  # CUDA copies a full addend into a new output first
        launches = mta_launches(lists) if lists and name not in ("cat", "stack") else 1
        self.add(name, read_bytes, total_bytes(written), flops, launches, matmul=name in MATMULS)

    def triton(self, kernel, args, kwargs):
        """A Triton launch, recorded instead of run."""
        fn = kernel
        while not inspect.isfunction(fn):
            fn = fn.fn
        if fn.__name__ not in TRITON_KERNELS:
            raise UncountedOp(f"bench.step has no rule for the Triton kernel {fn.__name__}: add it to TRITON_KERNELS")
        products, writes, updates = TRITON_KERNELS[fn.__name__]
        signature = inspect.signature(fn)  # kwargs also hold launch options (num_warps, ...): not arguments
        kwargs = {k: v for k, v in kwargs.items() if k in signature.parameters}
        bound = signature.bind_partial(*args, **kwargs).arguments
        tensors = {n: v for n, v in bound.items() if isinstance(v, torch.Tensor)}
        read = [t for n, t in tensors.items() if n not in writes]
        written = [t for n, t in tensors.items() if n in writes or n in updates]
        traffic = [total_bytes(read), total_bytes(written)]
        if fn.__name__ in POINTER_TABLES:
            table, n, rows = POINTER_TABLES[fn.__name__]
            for i in (0, 1):
                traffic[i] += bound[table].shape[1] * bound[n] * sum(row[i] for row in rows)
        flops = 0.0
        if products:
            B, H, T, d = bound["Q"].shape
            S = bound["K"].shape[2]
            flops = products * 2 * B * H * T * S * d * (0.5 if bound.get("CAUSAL") else 1.0)
        self.add(fn.__name__, *traffic, flops, matmul=products > 0)


def matmul_flops(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 m n k per product of a (..., m, k) and b (..., k, n)."""
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def grad_fns(tree) -> list:
    return [t.grad_fn for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def tag_nodes(inputs, output, phase: str) -> None:
    """Give the autograd nodes a module made, between its ``inputs`` and ``output``, the phase ``phase`` (those an
    inner module made have its phase already)."""
    seen = set(grad_fns(inputs))
    todo = grad_fns(output)
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.metadata.setdefault("phase", phase)
        todo += [next_node for next_node, _ in node.next_functions]


@contextlib.contextmanager
def recording(recorder: Recorder, model: torch.nn.Module):
    """Triton launches go to ``recorder`` instead of running; the model's modules keep its module stack."""
    names = {m: n for n, m in model.named_modules()}

    def pre(module, args):
        recorder.modules.append(names[module])

    def post(module, args, output):
        tag_nodes(args, output, phase_of(recorder.modules.pop()))

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    original = triton.runtime.jit.KernelInterface.__getitem__
    triton.runtime.jit.KernelInterface.__getitem__ = lambda kernel, grid: (
        lambda *args, **kwargs: recorder.triton(kernel, args, kwargs)
    )
    try:
        with recorder:
            yield
    finally:
        triton.runtime.jit.KernelInterface.__getitem__ = original
        for h in handles:
            h.remove()


def fp32_out_add_dw(dw: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The fused loss's CUDA path for dW: one fp32-output GEMM into dW (kernels/linear_cross_entropy.py's add_dw)."""
    return torch.addmm(dw, dlogits.t(), h, out_dtype=torch.float32, out=dw)


@contextlib.contextmanager
def cuda_standins():
    """What the kernels and Muon choose on an 80 GB CUDA card, where the fake tensors' CPU would choose otherwise."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(patch_attr(flce, "add_dw", fp32_out_add_dw))
        stack.enter_context(patch_attr(muon, "iteration_dtype", lambda u: torch.bfloat16))
        stack.enter_context(patch_attr(kernel_utils, "fp32_output_gemm", lambda device: True))  # Muon's too
        stack.enter_context(patch_attr(muon, "triton_device", lambda device: True))  # Muon's look-ahead kernel
        stack.enter_context(warnings.catch_warnings())  # whose table holds the fake matrices' addresses (0): no matter
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        # clip_grad_norm_ takes the foreach path for real CUDA tensors only, not for fake ones
        clip_grad = importlib.import_module("torch.nn.utils.clip_grad")
        stack.enter_context(patch_attr(clip_grad, "_has_foreach_support", lambda tensors, device: True))
        yield


@contextlib.contextmanager
def patch_attr(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@dataclass
class Step:
    """One counted step: its records, and what the summary needs to know about the model and optimizer."""

    case: BenchCase
    optimizer: str
    config: ModelConfig
    records: list[Record]
    other_minimum: int = 0  # the fused minimum's non-matmul bytes (module docstring)
    compiled: bool = False  # the model under torch.compile (--compile)

    @property
    def tokens(self) -> int:
        return self.case.batch * self.case.context


def count_step(case: BenchCase, optimizer: str) -> Step:
    """Run two fake training steps of ``case`` with ``optimizer`` ("muon" or "torch"); the second one's records."""
    config = ModelConfig.preset(case.preset, **(case.model_args or {}), context_length=case.context, backend="triton")
    with torch.device("meta"):  # no init on the CPU: the weights' values never matter here
        model = TransformerLM(config)
    with FakeTensorMode(), cuda_standins():
        model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
        if config.tie_embeddings:
            model.lm_head.weight = model.token_embeddings.weight
        ids = torch.zeros(case.batch, case.context, dtype=torch.long)
        train_cfg = TrainConfig(optimizer=optimizer)
        opt = build_optimizer(train_cfg.optimizer, model, torch.device("cuda"), train_cfg.schedule.max_lr)
        params = list(model.parameters())
        recorder = Recorder()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, ids)
            loss.backward()
            for recorder.phase, action in (
                ("clip", lambda: clip_gradients(optimizer, params, train_cfg.optimizer.grad_clip or math.inf)),
                ("optimizer", opt.step),
                ("zero_grad", lambda: opt.zero_grad(set_to_none=True)),
            ):
                action()
            recorder.phase = None

        for _ in range(2):  # the first builds the optimizer state and cast caches
            recorder.records.clear()
            with recording(recorder, model):
                step()
    in_muon = {id(p) for o in getattr(opt, "optimizers", ()) if isinstance(o, muon.Muon) for g in o.param_groups
               for p in g["params"]}  # fmt: skip
    # the fused minimum's optimizer: bytes per fp32 element (module docstring)
    per_param = {id(p): 4 + (20 if id(p) in in_muon else 28) + (2 if p.dim() == 2 else 0) for p in params}
    gathers = [r for r in recorder.records if r.op in ("embedding", "embedding_dense_backward")]
    minimum = moved(gathers) + sum(per_param[id(p)] * p.numel() for p in params)
    return Step(case, optimizer, config, recorder.records, minimum)


class Scheduled(Exception):
    """Raised once Inductor's scheduler has fused a graph: --compile neither generates nor runs its code."""


def fused_kernels(sched: scheduler.Scheduler, backward: bool) -> list[Record]:
    """A record for each kernel Inductor's scheduler keeps after fusion, but matmuls and our custom ops."""
    records = []
    for node in sched.nodes:
        inner = node.node if isinstance(node, scheduler.ExternKernelSchedulerNode) else None
        if isinstance(node, scheduler.NopKernelSchedulerNode) or isinstance(inner, ir.MultiOutput):
            continue
        op = getattr(inner, "op_overload", None)
        opaque = op is not None and (op.namespace == "smollm_stack" or op.overloadpacket.__name__ in MATMULS)
        if isinstance(inner, ir.ExternKernelOut) or opaque:
            continue
        name = f"inductor {'fallback ' + str(op) if inner is not None else 'kernel'}"
        records.append(
            Record(name, "compiled glue", backward, node.get_read_buffer_sizes(), node.get_write_buffer_sizes())
        )
    return records


def inductor_kernels(fn, *inputs) -> list[Record]:
    """The kernels Inductor's scheduler keeps after fusion when it compiles ``fn(*inputs)``: the forward and, where an
    output needs a gradient, the backward, compiled up front (module docstring); matmuls and our custom ops are left
    out (the eager count has them). Each graph stops at its scheduler: no code is generated, nothing runs."""
    records, backward = [], False

    def schedule(sched):
        records.extend(fused_kernels(sched, backward))
        raise Scheduled

    def compile_to_scheduler(gm, example_inputs, **kwargs):
        nonlocal backward
        backward = kwargs.get("is_backward", False)
        try:
            compile_fx_inner(gm, example_inputs, **kwargs)
        except Exception as e:  # Inductor wraps what its passes raise
            if not isinstance(getattr(e, "inner_exception", e), Scheduled):
                raise
        return never_run

    def never_run(*args):
        raise Scheduled

    torch._dynamo.reset()
    backend = functools.partial(compile_fx, inner_compile=compile_to_scheduler)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patch_attr(scheduler.Scheduler, "codegen", schedule))
        # CUDA's fp32-output GEMM (cuda_standins), which Inductor lowers for CUDA only: an opaque call here
        mm_fp32 = lowering.fallback_handler(torch.ops.aten.mm.dtype, add_to_fallback_set=False)
        stack.enter_context(unittest.mock.patch.dict(lowering.user_lowerings, {torch.ops.aten.mm.dtype: mm_fp32}))
        # no cache hit may skip the scheduler; one thread, since a worker pool would only cost its start
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False, compile_threads=1))
        stack.enter_context(
            torch._functorch.config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True)
        )
        with contextlib.suppress(Scheduled):
            torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    return records


def compiled_step(eager: Step) -> Step:
    """``eager``'s step with the model compiled by Inductor (module docstring)."""
    case = eager.case
    with torch.device("meta"):
        model = TransformerLM(eager.config)
    model = model.to_empty(device="cpu")  # real storage, never read: the compiled code never runs
    if eager.config.tie_embeddings:
        model.lm_head.weight = model.token_embeddings.weight
    ids = torch.zeros(case.batch, case.context, dtype=torch.long)
    clear_weight_cache()  # the eager count's fake weights
    # the traced backward makes CUDA's choices, as the eager count's does; rope's cache holds a fake tensor
    with cuda_standins(), patch_attr(rope, "_INV_FREQ", {}), torch.autocast("cpu", dtype=torch.bfloat16):
        records = inductor_kernels(model, ids, ids)
    kept = [r for r in eager.records if r.phase in STEP_PHASES or r.matmul or r.in_custom_op]
    return Step(case, eager.optimizer, eager.config, kept + records, eager.other_minimum, True)


def seconds(r: Record) -> float:
    """The roofline time of one record on the H100 (module docstring)."""
    flops_s = r.flops / (PEAK_FLOPS * MATMUL_EFFICIENCY)
    return max((r.read + r.written) / COPY_BANDWIDTH, flops_s) + r.launches * LAUNCH_OVERHEAD_S


def moved(records) -> int:
    return sum(r.read + r.written for r in records)


def summary(step: Step) -> dict:
    """The step's totals, per token and layer, its H100 prediction and the fused minimum."""
    rs, L = step.records, step.config.num_layers
    matmul = [r for r in rs if r.matmul]
    total, other = moved(rs), moved(rs) - moved(matmul)
    minimum_other = step.other_minimum
    seconds_step = sum(seconds(r) for r in rs)
    tokens_per_s = step.tokens / seconds_step
    return dict(
        launches=sum(r.launches for r in rs),
        bytes=total,
        bytes_per_token=total / step.tokens,
        bytes_per_token_layer=moved(r for r in rs if r.phase in LAYER_PHASES) / step.tokens / L,
        other_bytes=other,
        other_share=other / total,
        flops=sum(r.flops for r in rs),
        fused_minimum=moved(matmul) + minimum_other,
        other_minimum=minimum_other,
        other_ratio=other / minimum_other,
        total_ratio=total / (moved(matmul) + minimum_other),
        step_ms=1e3 * seconds_step,
        other_ms=1e3 * sum(seconds(r) for r in rs if not r.matmul),
        tokens_per_s=tokens_per_s,
        mfu=flops_per_token(step.config) * tokens_per_s / PEAK_FLOPS,
        x_llmc=tokens_per_s / LLMC_TOKENS_PER_S,
    )


def table(rows: dict, step: Step, head: str) -> list[str]:
    """A markdown table of grouped records: launches, MB read and written, bytes/token, GFLOP, predicted ms."""
    lines = [f"| {head} | launches | MB read | MB written | bytes/token | GFLOP | H100 ms |", "|---|" + "---:|" * 6]
    for key, rs in rows.items():
        lines.append(
            f"| {key} | {sum(r.launches for r in rs):,} | {sum(r.read for r in rs) / 1e6:,.1f} | "
            f"{sum(r.written for r in rs) / 1e6:,.1f} | {moved(rs) / step.tokens:,.0f} | "
            f"{sum(r.flops for r in rs) / 1e9:,.1f} | {1e3 * sum(seconds(r) for r in rs):.3f} |"
        )
    return lines


def group(records, key) -> dict:
    rows = defaultdict(list)
    for r in records:
        rows[key(r)].append(r)
    return rows


def phase_label(r: Record) -> str:
    if r.phase in STEP_PHASES:
        return r.phase
    return f"{r.phase} ({'backward' if r.backward else 'forward'})"


def report(step: Step) -> str:
    """Markdown: the summary, the table by phase, the table by op (largest predicted time first)."""
    s, c = summary(step), step.case
    phases = group(step.records, phase_label)
    ops = group(step.records, lambda r: r.op)
    ops = dict(sorted(ops.items(), key=lambda kv: -sum(seconds(r) for r in kv[1])))
    lines = [
        f"#### {c.preset}, {c.batch} x {c.context}, bf16 autocast, Triton kernels, optimizer {step.optimizer}"
        f"{', torch.compile' if step.compiled else ''}",
        "",
        f"- launches per step: {s['launches']:,}; FLOPs: {s['flops'] / 1e12:.2f} TFLOP",
        f"- HBM bytes: {s['bytes'] / 1e9:.2f} GB a step, {s['bytes_per_token']:,.0f} a token, "
        f"{s['bytes_per_token_layer']:,.0f} a token and layer (norm, attention, ffn, residual)",
        f"- non-matmul bytes: {s['other_bytes'] / 1e9:.2f} GB ({100 * s['other_share']:.0f}% of the bytes, "
        f"{s['other_ms']:.1f} ms of the predicted step)",
        f"- fused minimum: {s['fused_minimum'] / 1e9:.2f} GB a step ({s['other_minimum'] / 1e9:.2f} GB not matmul); "
        f"ours {s['total_ratio']:.2f}x it, non-matmul bytes {s['other_ratio']:.2f}x its",
        f"- H100 SXM roofline: {s['step_ms']:.1f} ms a step, {s['tokens_per_s']:,.0f} tokens/s, MFU "
        f"{100 * s['mfu']:.1f}%, {s['x_llmc']:.2f}x llm.c's {LLMC_TOKENS_PER_S:,} tokens/s per GPU",
        "",
        *table(phases, step, "phase"),
        "",
        *table(ops, step, "op"),
    ]
    return "\n".join(lines)


# Without value embeddings: under bf16 autocast they add fp32 values to the bf16 v projection, which attention refuses
SUMMARY_HEAD = (
    "| preset | batch x T | optimizer | launches | GB a step | bytes/token | bytes/token/layer | non-matmul "
    "| x fused minimum (all, non-matmul) | H100 ms | tokens/s | MFU | x llm.c |",
    "|---|---|---|" + "---:|" * 10,
)


def summary_row(step: Step) -> str:
    s, c = summary(step), step.case
    return (
        f"| {c.preset} | {c.batch} x {c.context} | {step.optimizer}{' compiled' if step.compiled else ''} | "
        f"{s['launches']:,} | {s['bytes'] / 1e9:.2f} | "
        f"{s['bytes_per_token']:,.0f} | {s['bytes_per_token_layer']:,.0f} | {100 * s['other_share']:.0f}% | "
        f"{s['total_ratio']:.2f}, {s['other_ratio']:.2f} | {s['step_ms']:.1f} | {s['tokens_per_s']:,.0f} | "
        f"{100 * s['mfu']:.1f}% | {s['x_llmc']:.2f} |"
    )


DRY_RUN_CASE = BenchCase("tiny", 2, 32, dict(d_model=64, num_layers=2, num_heads=2, vocab_size=256,
                                             value_embeddings=False))  # fmt: skip


def main(argv=None) -> int:
    parser = cli.parser("smollm_stack.bench.step", __doc__, dry_run="a tiny model, Muon")
    parser.add_argument("--preset", help="a model preset (default: the GPU cases of bench.train)")
    parser.add_argument("--batch", type=int, help="sequences a step (with --preset)")
    parser.add_argument("--context", type=int, help="tokens a sequence (with --preset)")
    parser.add_argument("--optimizer", choices=("muon", "torch"), help="default: both")
    parser.add_argument("--compile", action="store_true", help="also count the step with the model compiled")
    args = parser.parse_args(argv)
    if args.preset is not None:
        if args.batch is None or args.context is None or min(args.batch, args.context) < 1:
            return usage_error(parser, "--preset needs --batch and --context, positive")
        if args.preset not in PRESETS:
            return usage_error(parser, f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    cases = [DRY_RUN_CASE] if args.dry_run else [BenchCase(args.preset, args.batch, args.context)] if args.preset \
        else GPU_CASES  # fmt: skip
    optimizers = [args.optimizer] if args.optimizer else ["muon", "torch"]
    steps = [count_step(c, o) for c in cases for o in optimizers]
    if args.compile:
        steps = [s for eager in steps for s in (eager, compiled_step(eager))]
    print(f"### Training steps counted on the CPU ({env.versions()}, {env.today()})\n")
    print("\n".join([*SUMMARY_HEAD, *map(summary_row, steps)]) + "\n")
    print("\n\n".join(map(report, steps)))
    return 0


def usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
