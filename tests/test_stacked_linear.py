"""The stacked projections (kernels/stacked_linear.py) against the separate ones they replace.

Two copies of one model: the default, whose q/k/v and W1/W3 are one GEMM each on a per-step copy of the weights
(kernels/weight_cache.py), and one whose Linears keep no copy (``per_step_copy = False``: the separate products, as
before, and what FSDP2 runs). Same fp32 weights, same batch: the losses and every parameter's gradient agree to
rounding. Tolerance: the stacked and separate GEMMs compute the same K-term dot products (K <= d_ff = 96 here),
maybe summed in another order, so each differs by at most about 2 K u |x||w| (u = 2^-24): ~1.2e-5 relative, carried
through two blocks, the loss and the backward; rtol 1e-4 (atol 1e-4 of the largest gradient) leaves a margin of
several times that while a wrong split, a stale copy or a missing gradient is off by O(1).
"""

import copy

import pytest
import torch

from smollm_stack import kernels
from smollm_stack.kernels.stacked_linear import _side_by_side
from smollm_stack.model import Linear, ModelConfig, TransformerLM
from smollm_stack.train.optim.builder import Optimizers
from smollm_stack.train.optim.muon import Muon

CONFIG = dict(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96,
              backend="eager")  # fmt: skip


def pair(**overrides) -> tuple[TransformerLM, TransformerLM]:
    torch.manual_seed(0)
    stacked = TransformerLM(ModelConfig(**{**CONFIG, **overrides}))
    separate = copy.deepcopy(stacked)
    for m in separate.modules():
        if isinstance(m, Linear):
            m.per_step_copy = False
    return stacked, separate


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (3, 16), generator=g), torch.randint(0, 61, (3, 16), generator=g)


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.detach().abs().max()), msg=msg)


def assert_same_grads(stacked, separate):
    for (name, p), q in zip(stacked.named_parameters(), separate.parameters(), strict=True):
        assert p.grad is not None, name
        close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("overrides", [{}, {"value_embeddings": True, "norm": "post"}])
def test_stacked_projections_match_separate_ones_with_grad_accumulation(overrides):
    stacked, separate = pair(**overrides)
    for micro in range(3):  # three micro-batches into one set of gradients; the copy is made once
        ids, targets = batch(micro)
        losses = [m(ids, targets) for m in (stacked, separate)]
        close(losses[0], losses[1])
        for loss in losses:
            (loss / 3).backward()
    assert_same_grads(stacked, separate)


OPTIMIZERS = {
    "adamw fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),  # writes without bumping versions
    "adamw foreach": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True),
    "muon": lambda ps: Optimizers(Muon([p for p in ps if p.dim() == 2 and p.shape[0] != 61], lr=0.05),
                                  torch.optim.AdamW([p for p in ps if p.dim() < 2 or p.shape[0] == 61], lr=0.05)),
}  # fmt: skip


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_copy_follows_every_optimizer_step(name):
    """A stale copy after a step would give the stacked model the old weights: its loss and grads would drift."""
    models = pair()
    optimizers = [OPTIMIZERS[name](list(m.parameters())) for m in models]
    for step in range(2):  # a stale copy shows in the second
        ids, targets = batch(step)
        losses = [m(ids, targets) for m in models]
        close(losses[0], losses[1], msg=f"step {step}")
        for loss in losses:
            loss.backward()
        assert_same_grads(*models)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_the_copy_follows_load_state_dict_and_in_place_edits():
    stacked, separate = pair()
    ids, _ = batch(0)
    stacked(ids)  # builds the copies
    torch.manual_seed(1)
    new = TransformerLM(stacked.config).state_dict()
    for m in (stacked, separate):
        m.load_state_dict(new)
    close(stacked(ids), separate(ids))
    with torch.no_grad():
        for m in (stacked, separate):
            m.layers[0].attn.k_proj.weight.mul_(-2)
            m.layers[1].ffn.w3.weight.add_(0.5)
    close(stacked(ids), separate(ids))


def test_eval_no_grad_and_kv_cache_decoding_match():
    stacked, separate = pair()
    ids, _ = batch(0)
    with torch.no_grad():
        outs = []
        for m in (stacked.eval(), separate.eval()):
            caches = m.make_kv_caches(3, 16)
            outs.append(torch.cat([m(ids[:, :10], kv_caches=caches), m(ids[:, 10:11], kv_caches=caches)], 1))
        close(outs[0], outs[1])


def test_autocast_uses_one_copy_per_step_in_the_autocast_dtype():
    stacked, _ = pair()
    attn = stacked.layers[0].attn
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = kernels.stacked_linear(x, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert q.dtype == torch.bfloat16 and (q.shape, k.shape, v.shape) == ((2, 5, 32), (2, 5, 16), (2, 5, 16))
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(torch.bfloat16)
    expected = (x.to(torch.bfloat16).float() @ w.float().t()).to(torch.bfloat16)  # bf16 inputs, fp32 sums
    torch.testing.assert_close(torch.cat([q, k, v], -1), expected, rtol=2**-8, atol=1e-6)  # one bf16 rounding


def test_w1_w3_take_the_swiglu_gradient_back_without_a_copy(monkeypatch):
    """The Triton SwiGLU backward writes dg and du side by side into one buffer, and the split's backward hands that
    buffer to the stacked GEMM's backward as it is: no torch.cat (the eager ops give two tensors: one cat)."""
    torch.manual_seed(0)
    x, w1, w3 = (torch.randn(*shape, requires_grad=True) for shape in ((3, 5, 16), (24, 16), (24, 16)))
    dy = torch.randn(3, 5, 24)
    expected = torch.autograd.grad(kernels.eager.swiglu(x @ w1.t(), x @ w3.t()), (x, w1, w3), dy)
    y = kernels.swiglu(*kernels.stacked_linear(x, [w1, w3]))

    def no_cat(*args, **kwargs):
        raise AssertionError("the gradients of W1 x and W3 x were copied into one")

    monkeypatch.setattr(torch, "cat", no_cat)
    grads = torch.autograd.grad(y, (x, w1, w3), dy)
    monkeypatch.undo()
    for g, e in zip(grads, expected, strict=True):
        close(g, e)
    gate, up = torch.randn(3, 5, 48, requires_grad=True).split(24, -1)
    assert _side_by_side(list(torch.autograd.grad(kernels.eager.swiglu(gate, up), (gate, up), dy))) is None


def test_a_copy_made_under_inference_mode_serves_training():
    """generate() and evaluation run under inference_mode: the copy they make must still serve a training step."""
    stacked, separate = pair()
    ids, targets = batch(0)
    with torch.inference_mode():
        stacked(ids)
    with torch.no_grad():  # the copy is remade (an inference tensor could not be written in place out here)
        for m in (stacked, separate):
            m.layers[0].ffn.w1.weight.mul_(1.5)
    for m in (stacked, separate):
        m(ids, targets).backward()
    assert_same_grads(stacked, separate)


def test_the_compiled_backward_looks_the_copy_up_when_it_runs():
    """Under torch.compile the backward's stacked copy is the cache's, looked up when the compiled backward runs (the
    stacked_linear_backward op): stacking traced into the graph would copy every weight on every step."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    weights = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(2)]
    x = torch.randn(4, 16, requires_grad=True)
    torch._dynamo.reset()
    step = torch.compile(lambda x: torch.cat(kernels.stacked_linear(x, weights), -1).float().sum(), fullgraph=True,
                         backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(x)
    loss.backward()
    ops = [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]  # the backward
    assert "smollm_stack.stacked_linear_backward.default" in ops
    assert not [op for op in ops if "foreach" in op or op == "aten.mm.default"], ops  # no stacking, no GEMM traced
