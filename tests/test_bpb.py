"""Bits per byte: token byte lengths from the vocabulary, and the trainer's factor against per-token losses."""

import math

import numpy as np
import pytest
import torch

from smollm_stack.model import ModelConfig, TransformerLM
from smollm_stack.tokenizer import Tokenizer
from smollm_stack.train.data.tokens import EOT, batch_from_starts, eval_starts
from smollm_stack.train.log import format_row
from smollm_stack.train.metrics import bits_per_byte, bits_per_byte_factor, token_byte_lengths

TEXT = "héllo wörld, 你好 🙂<|endoftext|>he said"  # 1-, 2-, 3- and 4-byte characters and a special token


def _tokenizer() -> Tokenizer:
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"h", b"e"), (b"\xc3", b"\xa9"), (b"\xe4", b"\xbd")]  # the last ends mid-character (你 = e4 bd a0)
    for a, b in merges:
        vocab[len(vocab)] = a + b
    return Tokenizer(vocab, merges, [EOT])


def test_token_lengths_add_up_to_the_text_bytes():
    tok = _tokenizer()
    lengths = token_byte_lengths(tok, tok.vocab_size + 3)  # a model vocabulary padded past the tokenizer's
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # the merges did apply
    assert lengths[ids].sum() == len(TEXT.replace(EOT, "").encode("utf-8"))  # the special token: 0 bytes
    assert lengths[tok.special_token_id(EOT)] == 0 and list(lengths[-3:]) == [0, 0, 0]


def test_factor_gives_summed_token_losses_over_bytes():
    """bpb from the trainer's mean loss x factor = the definition: per-token nats summed / ln 2 / bytes."""
    tok = _tokenizer()
    data = np.array(tok.encode(TEXT * 7), dtype=np.int64)
    context, vocab = 9, tok.vocab_size
    starts = eval_starts(len(data), context, 5)
    lengths = token_byte_lengths(tok, vocab)
    model = TransformerLM(ModelConfig.preset("tiny", vocab_size=vocab, context_length=context, d_model=32))
    x, y = batch_from_starts(data, starts, context, "cpu")
    with torch.no_grad():
        mean_loss = model(x, y).item()
        logits = model(x).double()
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    want = nats / math.log(2) / lengths[y.numpy()].sum()
    got = bits_per_byte(mean_loss, bits_per_byte_factor(data, starts, context, lengths))
    # The model's mean is an fp32 reduction of 45 fp32 losses: relative error ~ 45 x 2^-24; 1e-5 leaves margin.
    assert got == pytest.approx(want, rel=1e-5)
    assert bits_per_byte(mean_loss, None) is None  # no tokenizer: no bytes to count


def test_only_special_targets_have_no_bpb_and_rows_show_it():
    tok = _tokenizer()
    eot = np.full(20, tok.special_token_id(EOT))
    assert bits_per_byte_factor(eot, [0, 5], 8, token_byte_lengths(tok, tok.vocab_size)) is None
    row = {"step": 5, "val_loss": 2.0, "val_ppl": math.exp(2.0), "val_bpb": 0.75}
    assert "val 2.0000 (ppl 7.4, 0.7500 bpb)" in format_row(row)
    assert "bpb" not in format_row({**row, "val_bpb": None})
