"""Document-aligned training windows (--windows aligned) against a token-by-token reference on awkward boundaries,
and the document ids of --doc-mask."""

import numpy as np
import pytest
import torch

from smollm_stack.model import TransformerLM
from smollm_stack.train.data.tokens import AlignedBatchSampler, BatchSampler, batch_sampler, document_ids, piece_starts
from smollm_stack.train.loop import run

EOT, T = 0, 4  # the separator's id, and the window length


def reference_starts(data, context_length: int) -> list[int]:
    """Walk the tokens: a piece starts at 0, at each separator, and context_length tokens after a piece start that
    is still in the same document; keep the starts with room for a whole window."""
    starts, piece = [], None
    for i, token in enumerate(data):
        if i == 0 or token == EOT or i - piece == context_length:
            piece = i
            starts.append(i)
    return [s for s in starts if s + context_length + 1 <= len(data)]


# Documents between separators: "a" of length 1 twice in a row, one that fills a window exactly (T - 1 tokens, then
# its separator is the last target), a long one of 2.5 windows, an empty one (two separators in a row), and no
# separator at the start or the end.
DOCS = [[7, 8], [5], [6], [1, 2, 3], list(range(1, 11)), [], [9, 9, 9], [4] * 6]


def corpus() -> np.ndarray:
    out = list(DOCS[0])
    for doc in DOCS[1:]:
        out += [EOT, *doc]
    return np.array(out, dtype=np.uint16)


def test_piece_starts_match_the_reference():
    data = corpus()
    for context in (1, 2, T, 5, 11):
        assert piece_starts(data, EOT, context).tolist() == reference_starts(data, context)
    eot = np.flatnonzero(data == EOT)
    starts = piece_starts(data, EOT, T)
    assert {0, *eot[eot <= len(data) - T - 1]} <= set(starts)  # every document that fits opens a window


def test_windows_on_awkward_boundaries():
    data = corpus()
    starts = piece_starts(data, EOT, T)
    windows = {int(s): data[s : s + T + 1] for s in starts}
    one_doc = int(np.flatnonzero(data == 1)[0]) - 1  # the separator before [1, 2, 3]
    assert windows[one_doc].tolist() == [EOT, 1, 2, 3, EOT]  # a window that is exactly one document
    short = int(np.flatnonzero(data == 5)[0]) - 1
    assert windows[short].tolist() == [EOT, 5, EOT, 6, EOT]  # two documents of length 1 packed into one window
    long = one_doc + 4  # the separator before range(1, 11): pieces every T tokens
    assert [s for s in starts if long <= s < long + 11] == [long, long + 4, long + 8]
    targets = set()
    for s in (long, long + 4, long + 8):
        targets |= set(range(s + 1, s + T + 1))
    assert set(range(long + 1, long + 12)) <= targets  # the long document and its separator are all targets


def test_sampled_starts_snap_to_their_piece_and_are_a_function_of_seed_and_step():
    data = np.tile(corpus(), 5)
    aligned = AlignedBatchSampler(data, 3, T, seed=7, slots=2, eot_id=EOT)
    uniform = BatchSampler(data, 3, T, seed=7, slots=2)
    pieces = reference_starts(data, T)
    for step in range(1, 20):
        for drawn, start in zip(uniform.starts(step), aligned.starts(step)):
            assert start == max(p for p in pieces if p <= drawn)  # the piece holding the uniformly drawn position
        again = AlignedBatchSampler(data, 6, T, seed=7, slots=1, eot_id=EOT)  # a resumed run, or other ranks
        np.testing.assert_array_equal(again.starts(step), aligned.starts(step))
        x, y = aligned.batch(step, 1, "cpu")
        assert x.shape == y.shape == (3, T) and (x[:, 1:] == y[:, :-1]).all()
    assert aligned.state_dict()["windows"] == "aligned"


def test_choice_and_errors():
    data = corpus()
    assert type(batch_sampler("uniform", data, 2, T, 0, 1, None)) is BatchSampler
    assert type(batch_sampler("aligned", data, 2, T, 0, 1, EOT)) is AlignedBatchSampler
    with pytest.raises(ValueError, match="--windows aligned needs .* --tokenizer"):
        batch_sampler("aligned", data, 2, T, 0, 1, None)


def test_document_ids_open_a_document_at_each_separator():
    x = torch.tensor([[5, EOT, 1, 2, EOT, EOT, 3], [EOT, 1, 1, 1, 1, 1, 1]])
    ids = document_ids(x, EOT)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]


def test_doc_mask_passes_the_ids_to_every_forward(tmp_path, monkeypatch):
    """--doc-mask: every training and evaluation forward gets document_ids of its inputs (the model knows no
    tokenizer, so the trainer must compute them); without --doc-mask none does."""
    from test_train_run import tiny
    from smollm_stack.tokenizer import Tokenizer

    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    tokenizer.save(tmp_path / "tok")
    eot = tokenizer.special_token_id("<|endoftext|>")
    rng = np.random.default_rng(0)
    data = rng.integers(1, 64, size=2000).astype(np.uint16)
    data[rng.random(2000) < 0.1] = eot
    for name in ("train", "val"):
        np.save(tmp_path / f"{name}.npy", data)
    seen, forward = [], TransformerLM.forward

    def spy(self, ids, targets=None, positions=None, kv_caches=None, doc_ids=None):
        seen.append((ids, doc_ids))
        return forward(self, ids, targets, positions, kv_caches, doc_ids)

    monkeypatch.setattr(TransformerLM, "forward", spy)
    tokens = (str(tmp_path / "train.npy"), str(tmp_path / "val.npy"))
    overrides = dict(tokenizer=str(tmp_path / "tok"), vocab_size=None, steps=2, eval_interval=2, windows="aligned")
    run(tiny(tokens, tmp_path / "masked", doc_mask=True, **overrides))
    assert len(seen) > 2 and all(torch.equal(d, document_ids(x, eot)) for x, d in seen)
    assert any(d.max() > d.min() for _, d in seen)  # windows that really hold several documents
    seen.clear()
    run(tiny(tokens, tmp_path / "plain", **overrides))
    assert seen and all(d is None for _, d in seen)
