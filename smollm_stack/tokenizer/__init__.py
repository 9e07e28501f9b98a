"""Byte-level BPE: a Numba trainer and encoder that match a pure-Python reference (tokenizer/reference.py) exactly.

    from smollm_stack.tokenizer import train_bpe, Tokenizer, encode_file
"""

from smollm_stack.tokenizer.file_encoder import encode_batches, encode_file
from smollm_stack.tokenizer.tokenizer import Tokenizer
from smollm_stack.tokenizer.trainer import train_bpe, train_bpe_batches

__all__ = ["Tokenizer", "encode_batches", "encode_file", "train_bpe", "train_bpe_batches"]
