"""RoPE then attention as one op (kernels/rope_attention.py) against the reference's RoPE and explicit softmax.

q, k, v are the head views of one (B, T, H + 2 Hkv, d) leaf, as the model's are of its stacked projection, so the
leaf's gradient checks dq, dk, dv and the layout they land in. Shapes: GQA and MQA, T not a multiple of the
interpreter's 16/32-row blocks, positions (T,) and (B, T) with an offset, documents. Tolerances: test_attention's
4 roundings, plus the rotated q and k rounded to the dtype in the forward and dq, dk rounded again after the inverse
rotation in the backward: 6 (fp32 has no such roundings on the reference side either; its row holds them all).
"""

import pytest
import torch
from test_attention import DEVICE, SCALE, Case
from test_attention_atomic import atomic  # noqa: F401 (a fixture)
from test_attention_documents import doc_ids

from smollm_stack import kernels
from smollm_stack.kernels import eager
from smollm_stack.kernels import reference as ref
from smollm_stack.model import ModelConfig, TransformerLM
from conftest import assert_close

pytestmark = pytest.mark.usefixtures("poison_outputs")
ROUNDINGS = 6
CASES = {  # (case, per-sequence positions, doc_ids)
    "mha-17": (Case(1, 2, 2, 17, 17, 16), False, None),
    "mqa-67-batch-positions": (Case(2, 4, 1, 67, 67, 32), True, None),
    "gqa-33-d64": (Case(1, 4, 2, 33, 33, 64), False, None),
    "gqa-67-docs": (Case(2, 2, 1, 67, 67, 16), False, doc_ids([15, 18, 14, 2, 18], [47, 2, 17, 1])),
}


def heads(qkv: torch.Tensor, case: Case):
    """The (B, H, T, d), (B, Hkv, T, d), (B, Hkv, T, d) head views of a (B, T, H + 2 Hkv, d) tensor."""
    return [x.transpose(1, 2) for x in qkv.split([case.heads, case.kv_heads, case.kv_heads], 2)]


def run(fn, qkv, positions, do, case: Case, ids):
    """fn's output and the gradient of the (B, T, H + 2 Hkv, d) leaf qkv whose head views are q, k, v."""
    qkv = qkv.detach().clone().requires_grad_()
    out = fn(*heads(qkv, case), positions, 500.0, doc_ids=ids)
    out.backward(do)
    return out.detach(), qkv.grad


def inputs(case: Case, batch_positions: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, d = case.batch, case.heads, case.kv_heads, case.q_len, case.head_dim
    qkv = torch.randn(B, T, H + 2 * Hkv, d, generator=g).to(DEVICE, dtype)
    do = torch.randn(B, H, T, d, generator=g).to(DEVICE, dtype)
    positions = torch.arange(T) + 3 if not batch_positions else torch.randint(0, 4 * T, (B, T), generator=g)
    return qkv, positions.to(DEVICE), do


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name, dtype):
    case, batch_positions, ids = CASES[name]
    qkv, positions, do = inputs(case, batch_positions, dtype)
    out, dqkv = run(kernels.rope_flash_attention, qkv, positions, do, case, ids)
    expected = run(ref.rope_flash_attention, qkv.float(), positions, do.float(), case, ids)
    assert out.dtype == dqkv.dtype == dtype
    for a, e, what in zip((out, dqkv), expected, ("out", "dqkv")):
        assert_close(a.float(), e, dtype, ROUNDINGS, SCALE, msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.usefixtures("atomic")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_atomic_backward_matches_reference(dtype):
    """The one-pass backward: its fp32 dQ sum cast (or copied, in fp32) into the buffer's dq slice."""
    test_matches_reference("gqa-67-docs", dtype)


def test_eager_matches_reference():
    case, batch_positions, ids = CASES["gqa-67-docs"]
    qkv, positions, do = inputs(case, batch_positions, torch.float32)
    actual = run(eager.rope_flash_attention, qkv, positions, do, case, ids)
    for a, e in zip(actual, run(ref.rope_flash_attention, qkv, positions, do, case, ids)):
        assert_close(a, e, torch.float32, ROUNDINGS, SCALE)


def test_the_projection_gets_its_gradient_without_a_copy(monkeypatch):
    """The model's attention block: the backward writes dq, dk, dv side by side, so the stacked projection's split
    hands that buffer back as it is, and no torch.cat runs; q, k, v's gradients match the eager backend's."""
    config = dict(vocab_size=61, context_length=40, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=96)
    torch.manual_seed(0)
    attn = {b: TransformerLM(ModelConfig(**config, backend=b)).layers[0].attn for b in ("triton", "eager")}
    attn["eager"].load_state_dict(attn["triton"].state_dict())
    x = torch.randn(2, 37, 64)
    dy = torch.randn(2, 37, 64)
    expected = torch.autograd.grad(attn["eager"](x.requires_grad_()), x, dy)[0]
    y = attn["triton"](x)

    def no_cat(*args, **kwargs):
        raise AssertionError("the gradients of q, k and v were copied into one")

    monkeypatch.setattr(torch, "cat", no_cat)
    (dx,) = torch.autograd.grad(y, x, dy)
    monkeypatch.undo()
    assert_close(dx, expected, torch.float32, ROUNDINGS, SCALE)
