"""torch.compile(fullgraph=True) traces through the Triton ops and gives what they give uncompiled.

Each op is a torch.library custom op with a fake implementation and autograd, so Dynamo and AOTAutograd see one
opaque node per launch instead of graph-breaking on a Triton call. On a CPU the kernels run under the interpreter,
so shapes are tiny and the backend is "aot_eager" (AOTAutograd's joint forward/backward graph, run eagerly): it
exercises the fake implementations, the autograd registration and functionalization, which is what Inductor
builds on. Compiled and uncompiled runs launch the same kernels on the same data, so they must agree exactly.
"""

import pytest
import torch

from smollm_stack import kernels
from smollm_stack.kernels.rope import apply_rope_qk
from smollm_stack.model import ModelConfig, TransformerLM

pytestmark = pytest.mark.usefixtures("poison_outputs")  # an element never written is NaN in both runs: not equal


def _leaves(inputs):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]


def _loss_and_grads(fn, inputs):
    leaves = _leaves(inputs)
    out = fn(*leaves)
    loss = out if out.dim() == 0 else (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    loss.backward()
    return loss.detach(), [t.grad for t in leaves if t.is_floating_point()]


def _assert_compiled_matches(fn, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ref_loss, ref_grads = _loss_and_grads(fn, inputs)
    loss, grads = _loss_and_grads(compiled, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=0, atol=0)


positions = torch.arange(7)
targets = torch.tensor([3, -100, 0, 30, 7, 1, 2])
doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
OPS = {
    "rms_norm": (lambda x, w: kernels.rms_norm(x, w), [torch.randn(2, 7, 24), torch.randn(24)]),
    "rms_norm_out_dtype": (lambda x, w: kernels.rms_norm(x, w, out_dtype=torch.float16),
                           [torch.randn(2, 7, 24), torch.randn(24)]),
    # the fp32 stream plus a fp16 branch: h and y both used, and y alone (no gradient flows into h)
    "add_rms_norm": (lambda x, r, w: torch.cat([t.float().flatten() for t in kernels.add_rms_norm(x, r, w)]),
                     [torch.randn(2, 7, 24), torch.randn(2, 7, 24).half(), torch.randn(24)]),
    "add_rms_norm_y_only": (lambda x, r, w: kernels.add_rms_norm(x, r, w, out_dtype=torch.float16)[1],
                            [torch.randn(2, 7, 24), torch.randn(2, 7, 24).half(), torch.randn(24)]),
    "swiglu": (kernels.swiglu, [torch.randn(2, 7, 24), torch.randn(2, 7, 24)]),
    "swiglu_halves": (lambda h: kernels.swiglu(*h.split(24, -1)), [torch.randn(2, 7, 48)]),  # W1 x, W3 x in one
    "stacked_linear": (lambda x, a, b: torch.cat(kernels.stacked_linear(x, [a, b]), -1),
                       [torch.randn(2, 7, 16), torch.randn(12, 16), torch.randn(4, 16)]),
    "apply_rope": (lambda x: kernels.apply_rope(x, positions), [torch.randn(2, 3, 7, 8)]),
    "apply_rope_qk": (lambda q, k: torch.cat([y.flatten() for y in apply_rope_qk(q, k, positions)]),
                      [torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)]),
    "cross_entropy": (lambda x: kernels.cross_entropy(x, targets), [torch.randn(7, 31)]),
    "cross_entropy_overwrite": (lambda x: kernels.cross_entropy(x * 2, targets, overwrite_logits=True),
                                [torch.randn(7, 31)]),
    "fused_linear_cross_entropy": (lambda h, w: kernels.fused_linear_cross_entropy(h, w, targets, chunk_size=4),
                                   [torch.randn(7, 16), torch.randn(31, 16)]),
    "flash_attention": (kernels.flash_attention, [torch.randn(1, 4, 5, 16), torch.randn(1, 2, 9, 16),
                                                  torch.randn(1, 2, 9, 16)]),  # GQA, decoding (T < S)
    "flash_attention_docs": (lambda q, k, v: kernels.flash_attention(q, k, v, doc_ids=doc_ids),
                             [torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)]),
    # q, k, v as the head views of one (B, T, H + 2 Hkv, d) leaf, as the model's are of its projection
    "rope_flash_attention": (lambda qkv: kernels.rope_flash_attention(
        *(x.transpose(1, 2) for x in qkv.split([4, 2, 2], 2)), torch.arange(9), doc_ids=doc_ids),
        [torch.randn(1, 9, 8, 16)]),
}  # fmt: skip


@pytest.mark.parametrize("name", OPS)
def test_op_compiles_fullgraph(name):
    fn, inputs = OPS[name]
    _assert_compiled_matches(fn, inputs)


def test_triton_model_compiles_fullgraph():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=31, context_length=8, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2,
                         d_ff=48, backend="triton")  # fmt: skip
    model = TransformerLM(config)
    ids, t = torch.randint(0, 31, (2, 8)), torch.randint(0, 31, (2, 8))
    t[0, :2] = -100
    torch._dynamo.reset()
    results = []
    for m in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        loss = m(ids, t)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=0, msg=name)

