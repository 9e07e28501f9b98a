"""Byte-level BPE: a Numba trainer and encoder that match a pure-Python reference (tokenizer/reference.py) exactly.

    from tokenizer import train_bpe, Tokenizer, encode_file
"""

from tokenizer.file_encoder import encode_file
from tokenizer.tokenizer import Tokenizer
from tokenizer.trainer import train_bpe

__all__ = ["Tokenizer", "encode_file", "train_bpe"]
