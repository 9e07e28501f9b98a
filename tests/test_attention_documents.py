"""Attention masked across documents (doc_ids): the Triton kernel, the eager backend and the model against the
explicit-softmax reference, on awkward document boundaries.

On a CPU the kernel runs on Triton's interpreter with 16x32 tiles (forward, dK/dV) and 32x16 (dQ), so T = 67 spans
five query blocks and a ragged last one, and the layouts below put boundaries on, one before and one after those
block edges. Tolerances are test_attention's (its rounding count on conftest's table): a masked row's softmax
and its gradients sum a subset of the same <= 67 keys as the causal row, so the same error analysis bounds them.
"""

import functools

import pytest
import torch
from test_attention import DEVICE, Case, assert_all_close, make_inputs, run_with_grads
from test_eager_backend import DTYPES, assert_near, half_supported, run_both

from smollm_stack import kernels
from smollm_stack.kernels import _utils, eager
from smollm_stack.kernels import reference as ref

pytestmark = pytest.mark.usefixtures("poison_outputs")


def doc_ids(*rows: list[int], ordered: bool = True) -> torch.Tensor:
    """(B, S) ids from each row's document lengths: 0, 1, 2, ... (ordered), or alternating 7, 3, 7, ... (a document
    is a run of equal ids, so an id may come back later as a new document)."""
    out = []
    for lengths in rows:
        ids = torch.arange(len(lengths)) if ordered else torch.tensor([7, 3] * len(lengths))[: len(lengths)]
        out.append(torch.repeat_interleave(ids, torch.tensor(lengths)))
    return torch.stack(out).to(DEVICE)


GQA = Case(2, 2, 1, 67, 67, 16)  # GQA, ragged T
LAYOUTS = {  # name: (case, doc_ids); the two batch rows differ so that per-row offsets are exercised
    "length-1-docs": (GQA, doc_ids([1, 1, 14, 1, 1, 16, 33], [66, 1])),
    "on-block-edges": (GQA, doc_ids([16, 16, 32, 3], [32, 32, 3], ordered=False)),
    "one-off-block-edges": (GQA, doc_ids([15, 18, 14, 2, 18], [47, 2, 17, 1])),
    "one-document": (GQA, doc_ids([67], [67])),
    "decode-5-of-40": (Case(2, 4, 1, 5, 40, 32), doc_ids([30, 8, 2], [36, 4])),
    "decode-1-of-40": (Case(2, 2, 2, 1, 40, 16, scale=0.3), doc_ids([39, 1], [1, 39], ordered=False)),
}


def with_docs(fn, ids):
    return functools.partial(fn, doc_ids=ids)


# fp16 (P and dS rounded before their dots) on the layouts with the most boundaries; every layout in fp32.
KERNEL_CASES = [(layout, torch.float32) for layout in LAYOUTS]
KERNEL_CASES += [(layout, torch.float16) for layout in ("length-1-docs", "one-off-block-edges", "decode-5-of-40")]


@pytest.mark.parametrize("layout, dtype", KERNEL_CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_kernel_matches_reference(layout, dtype):
    case, ids = LAYOUTS[layout]
    q, k, v, do = make_inputs(case, dtype)
    actual = run_with_grads(with_docs(kernels.flash_attention, ids), q, k, v, do, case)
    expected = run_with_grads(with_docs(ref.flash_attention, ids), q.float(), k.float(), v.float(), do.float(), case)
    assert [t.dtype for t in actual] == [dtype] * 4
    assert_all_close(actual, expected, dtype)
    if layout == "one-document":  # the same blocks visited, the same math: bitwise the plain causal kernel
        for a, b in zip(actual, run_with_grads(kernels.flash_attention, q, k, v, do, case)):
            assert torch.equal(a, b)


@pytest.mark.skipif(not _utils.INTERPRET, reason="the block sizes below are the interpreter's")
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the rows that do read the NaN keys
def test_blocks_of_earlier_documents_are_skipped_not_masked():
    """Documents [0, 40) and [40, 67). NaN in K/V of keys 0..31: query blocks starting at 48 (forward, 16 rows) and
    64 (dQ, 32 rows) begin in the second document, so they must never read that key block; a masked read would
    turn their rows to NaN (0 * NaN in P V). Likewise NaN in q/dO of rows 48.. must not reach dK/dV of keys 0..31,
    whose document ends at 40: the key block's loop over queries stops at the query block holding 40."""
    case, ids = Case(1, 2, 2, 67, 67, 16), doc_ids([40, 27])
    q, k, v, do = make_inputs(case, torch.float32)
    expected = run_with_grads(with_docs(ref.flash_attention, ids), q, k, v, do, case)
    k_nan, v_nan = (t.detach().clone().index_fill_(2, torch.arange(32), float("nan")) for t in (k, v))
    out, dq, _, _ = run_with_grads(with_docs(kernels.flash_attention, ids), q, k_nan, v_nan, do, case)
    torch.testing.assert_close(out[:, :, 48:], expected[0][:, :, 48:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq[:, :, 64:], expected[1][:, :, 64:], atol=1e-5, rtol=1e-5)
    q_nan, do_nan = (t.detach().clone().index_fill_(2, torch.arange(48, 67), float("nan")) for t in (q, do))
    _, _, dk, dv = run_with_grads(with_docs(kernels.flash_attention, ids), q_nan, k, v, do_nan, case)
    torch.testing.assert_close(dk[:, :, :32], expected[2][:, :, :32], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv[:, :, :32], expected[3][:, :, :32], atol=1e-5, rtol=1e-5)


def test_document_bounds():
    ids = torch.tensor([[7, 7, 3, 3, 3, 7], [0, 1, 2, 3, 4, 5]])
    assert _utils.document_starts(ids).tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 2, 3, 4, 5]]
    assert _utils.document_ends(ids).tolist() == [[2, 2, 5, 5, 5, 6], [1, 2, 3, 4, 5, 6]]
    assert _utils.document_starts(ids).dtype == torch.int32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["one-off-block-edges", "decode-5-of-40", "decode-1-of-40"])
def test_eager_matches_reference(layout, dtype):
    """The eager backend's block-causal SDPA mask against the reference's, to test_eager_backend's bound."""
    case, ids = LAYOUTS[layout]
    q, k, v, _ = (t.detach().to(dtype) for t in make_inputs(case, torch.float32))
    fn = with_docs(eager.flash_attention, ids)
    if not half_supported(dtype, lambda: fn(q, k, v)):
        pytest.skip(f"no CPU attention kernel for {dtype}")
    (y, gold), grads = run_both(fn, with_docs(ref.flash_attention, ids), [q, k, v])
    S, d, group = case.kv_len, case.head_dim, case.heads // case.kv_heads
    assert_near(y, gold, dtype, n=S + d, r=3)
    for (g, g_gold), name in zip(grads, ("dq", "dk", "dv")):
        assert_near(g, g_gold, dtype, n=2 * (S + d) * group, r=4, name=name)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_model_with_doc_ids_equals_each_document_alone(backend):
    """The strongest semantic check: logits of a packed window with doc_ids are those of each document run on its
    own from position 0. RoPE is relative, so a document's shift in position cancels in q.k up to the rounding of
    the angles (positions < 32: a few fp32 ulps), inside the fp32 model tolerance of tests/test_model.py."""
    from smollm_stack.model import ModelConfig, TransformerLM

    config = ModelConfig(vocab_size=61, context_length=32, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         backend=backend)
    torch.manual_seed(0)
    model = TransformerLM(config).to(DEVICE)
    lengths = [[1, 16, 6], [9, 14]]
    ids = torch.randint(0, 61, (2, 23), device=DEVICE)
    docs = doc_ids(*lengths)
    with torch.no_grad():
        packed = model(ids, doc_ids=docs)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(ids[b : b + 1, start : start + n])[0]
                torch.testing.assert_close(packed[b, start : start + n], alone, atol=1e-4, rtol=1e-4)
                start += n
        assert not torch.allclose(packed, model(ids), atol=1e-2)  # the documents really did see each other before


@pytest.mark.parametrize("fn", [kernels.flash_attention, eager.flash_attention], ids=["triton", "eager"])
@pytest.mark.parametrize(
    "ids, kwargs, error, match",
    [
        (torch.zeros(1, 8, dtype=torch.int32), {"causal": False}, ValueError, "causal attention only"),
        (torch.zeros(1, 7, dtype=torch.int32), {}, ValueError, r"\(B, S\) = \(1, 8\)"),
        (torch.zeros(1, 8), {}, TypeError, "integer tensor"),
        (torch.zeros(1, 8, dtype=torch.bool), {}, ValueError, "integers"),
    ],
)
def test_rejects_bad_doc_ids(fn, ids, kwargs, error, match):
    q = torch.zeros(1, 2, 8, 16)
    with pytest.raises(error, match=match):
        fn(q, q, q, doc_ids=ids, **kwargs)
