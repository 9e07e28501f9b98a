"""The one-pass backward with an atomic dQ (SMOLLM_ATTENTION_BWD=atomic) against the explicit-softmax reference:
output and dq, dk, dv on test_attention's awkward shapes (ragged T and S, GQA, decoding, non-causal) and
test_attention_documents' document layouts, huge scores, and the choice itself.

Tolerances are test_attention's: the atomic pass rounds where the two-pass one does (P and dS to the input dtype before
their dots, dQ once to it at the end); what changes is the order of dQ's fp32 sum over key blocks (tile partials
added into an fp32 buffer instead of one accumulator), a few fp32 roundings, inside the fp32 row. In the interpreter
the key blocks run one after another, so the order is fixed here; on a GPU it is not (bf16 and determinism below).
"""

import pytest
import test_attention
import torch
from test_attention import CASES, DTYPES, GPU_ONLY, Case, assert_all_close, assert_within_score_rounding
from test_attention import fp32_reference, make_inputs, run_with_grads
from test_attention_documents import LAYOUTS, with_docs

from smollm_stack import kernels
from smollm_stack.kernels import attention
from smollm_stack.kernels import reference as ref

pytestmark = pytest.mark.usefixtures("poison_outputs")


@pytest.fixture
def atomic(monkeypatch):
    """The atomic backward, with the two-pass dQ kernel gone: a launch of it would fail the test."""
    monkeypatch.setattr(attention, "_attn_bwd_dq", None)
    with attention.backward_pass("atomic"):
        yield


SHAPES = ["mha-odd", "mqa-67", "gqa-d64", "decode-1-of-37", "prefill-20-of-53-scaled", "noncausal-17-by-67",
          "noncausal-45-by-19"]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(atomic, shape, dtype):
    case = CASES[shape]
    q, k, v, do = make_inputs(case, dtype)
    actual = run_with_grads(kernels.flash_attention, q, k, v, do, case)
    assert [t.dtype for t in actual] == [dtype] * 4
    assert_all_close(actual, fp32_reference(q, k, v, do, case), dtype)


DOC_CASES = [(layout, torch.float32) for layout in ("length-1-docs", "one-off-block-edges", "decode-5-of-40")]
DOC_CASES += [("one-off-block-edges", torch.float16)]


@pytest.mark.parametrize("layout, dtype", DOC_CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_documents_match_reference(atomic, layout, dtype):
    case, ids = LAYOUTS[layout]
    q, k, v, do = make_inputs(case, dtype)
    actual = run_with_grads(with_docs(kernels.flash_attention, ids), q, k, v, do, case)
    expected = run_with_grads(with_docs(ref.flash_attention, ids), q.float(), k.float(), v.float(), do.float(), case)
    assert_all_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal-huge", "noncausal-all-negative"])
def test_large_scores_stay_finite_and_correct(atomic, dtype, causal):
    """test_attention's huge scores (causal), and non-causal rows whose every score is below -144 (q.k of integer
    entries <= -3 and >= 3, d = 16): their base-2 log-sum-exp is below -208, so a key past S (a zero row of the
    ragged last key block, S = 19 of 32) would get P = exp2(0 - lse) = inf, and inf x its zero K row a NaN in dQ,
    unless it is masked. The two-pass dQ never reads such keys; here they share the dK/dV pass's tiles."""
    if causal:
        case = Case(1, 4, 2, 33, 45, 16, scale=0.25)
        q, k, v, do = make_inputs(case, dtype, magnitude=50.0)
        q, k, least = q.detach().round(), k.detach().round(), 1e4
    else:
        case = Case(1, 2, 1, 45, 19, 16, causal=False, scale=1.0)
        q, k, v, do = make_inputs(case, dtype)
        q, k, least = -(q.detach().abs().round() + 3), k.detach().abs().round() + 3, 143
    q, k = q.requires_grad_(), k.requires_grad_()
    assert_within_score_rounding(kernels.flash_attention, q, k, v, do, case, dtype, least)


def test_the_choice():
    """backward_pass names one of BACKWARD_PASSES; a bad $SMOLLM_ATTENTION_BWD is one clear error at the call."""
    with pytest.raises(ValueError, match="backward pass must be one of"):
        with attention.backward_pass("fast"):
            pass
    q = torch.zeros(1, 2, 8, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention._BACKWARD_PASS, "current", "atomc")
        with pytest.raises(ValueError, match=r"\$SMOLLM_ATTENTION_BWD must be one of .*'atomc'"):
            kernels.flash_attention(q, q, q)


@GPU_ONLY
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_flashattention_rule_and_determinism(atomic, head_dim):
    """bf16 error at most the two-pass backward's FlashAttention-rule bound (test_attention), dK and dV bitwise the
    same on a second run; dQ, summed by atomics in the order the GPU runs them, within one bf16 ulp (2^-7 relative)."""
    test_attention.test_bf16_flashattention_rule(head_dim)
    case = Case(2, 8, 2, 1000, 1000, head_dim)
    q, k, v, do = make_inputs(case, torch.bfloat16)
    first, second = (run_with_grads(kernels.flash_attention, q, k, v, do, case) for _ in range(2))
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        if name == "dq":
            torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * a.abs().max().item())
        else:
            assert torch.equal(a, b), name
