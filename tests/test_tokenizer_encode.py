"""Encoding and decoding: GPT-2 files against tiktoken, our trained files against the pure-Python reference,
round trips, encode_iterable and encode_file against encode, the file format, bad input, and the CLI.
"""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smollm_stack.tokenizer import Tokenizer, encode_file, train_bpe
from smollm_stack.tokenizer import file_encoder
from smollm_stack.tokenizer.__main__ import main
from smollm_stack.tokenizer.pretokenize import GPT2_PATTERN
from smollm_stack.tokenizer.reference import encode_reference
from smollm_stack.tokenizer.bytes_unicode import text_to_bytes

DATA = Path(__file__).parent / "data"
EOT, EOT2 = "<|endoftext|>", "<|endoftext|><|endoftext|>"
VARIED = [
    "",
    "Hello, world! It's 2024; we'll see.",
    "naïve café, über, ÉCOLE, ñ",
    "中文字符和日本語のテキスト",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "tabs\tand   spaces   \n\n\n  trailing   ",
    "digits 1234567890 ٣٤٥ ２３",
    "don't I'm you're we've they'll he'd 'S 'LL",
    f"special {EOT} in {EOT}{EOT} the middle{EOT}",
    "\u00a0nbsp \u2028line\u3000ideographic \r\n windows",
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """Our Tokenizer and tiktoken's Encoding, both built from GPT-2's vocab.json and merges.txt."""
    ours = Tokenizer.from_files(DATA / "gpt2_vocab.json.gz", DATA / "gpt2_merges.txt.gz", [EOT])  # gzip read as is
    vocab = json.loads(gzip.decompress((DATA / "gpt2_vocab.json.gz").read_bytes()))
    ranks = {text_to_bytes(t, "vocab.json"): i for t, i in vocab.items() if t != EOT}
    theirs = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: vocab[EOT]})
    return ours, theirs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer trained on the TinyStories excerpt, with an overlapping pair of special tokens."""
    vocab, merges = train_bpe(DATA / "tinystories_excerpt.txt", 600, [EOT, EOT2], num_workers=1)
    return Tokenizer(vocab, merges, [EOT, EOT2])


@pytest.mark.parametrize("text", VARIED)
def test_gpt2_matches_tiktoken(gpt2, text):
    ours, theirs = gpt2
    assert ours.encode(text) == theirs.encode(text, allowed_special="all")


def test_gpt2_matches_tiktoken_on_a_story(gpt2):
    ours, theirs = gpt2
    text = (DATA / "tinystories_excerpt.txt").read_text(encoding="utf-8")
    assert ours.encode(text) == theirs.encode(text, allowed_special="all")
    assert ours.special_token_id(EOT) == 50256 and len(ours) == 50257


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_gpt2_matches_tiktoken_on_random_text(gpt2, text):
    ours, theirs = gpt2
    assert ours.encode(text) == theirs.encode_ordinary(text)


@pytest.mark.parametrize("text", VARIED + [f"{EOT2}{EOT}{EOT2}{EOT2}x{EOT}"])
def test_trained_matches_reference(trained, text):
    expected = encode_reference(text, trained.vocab, trained.merges, [EOT, EOT2])
    assert trained.encode(text) == expected
    assert trained.encode(EOT2 + EOT) == [1, 0]  # longest special first


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.lists(st.sampled_from(list("ab '\n😀é") + [EOT]), max_size=40).map("".join))
def test_decode_inverts_encode(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_decode_replaces_broken_utf8(gpt2):
    ours, _ = gpt2
    lead_byte = next(i for i, b in ours.vocab.items() if b == "€".encode()[:1])  # a UTF-8 lead byte alone
    assert ours.decode([lead_byte] + ours.encode("a")) == "\ufffda"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["Once", " a", " ", "  ", "\n", "x\n", EOT, "<|endo", "ftext|>", "é😀"]), max_size=300))
def test_encode_iterable_matches_encode(trained, parts):
    assert list(trained.encode_iterable(iter(parts), flush_bytes=16)) == trained.encode("".join(parts))


def test_encode_iterable_is_lazy(trained):
    def lines():
        yield "Once upon a time.\n" * 100
        raise RuntimeError("read too far")

    ids = trained.encode_iterable(lines(), flush_bytes=64)
    assert next(ids) == trained.encode("Once")[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_encode_file_matches_encode(tmp_path, trained, monkeypatch, workers):
    monkeypatch.setattr(file_encoder, "CHUNK_BYTES", 2048)  # many chunks
    text = (DATA / "tinystories_excerpt.txt").read_text(encoding="utf-8") + VARIED[4] + EOT2
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    ids = encode_file(src, trained, tmp_path / "out.npy", num_workers=workers, progress=False)
    assert ids.dtype == np.uint16
    assert ids.tolist() == trained.encode(text)
    assert np.load(tmp_path / "out.npy").tolist() == ids.tolist()


def test_encode_file_gives_the_heap_back_after_every_chunk(tmp_path, trained, monkeypatch):
    """Memory stays flat on a file of any size only if each chunk's freed buffers go back to the OS (parallel.py)."""
    monkeypatch.setattr(file_encoder, "CHUNK_BYTES", 2048)
    trims = []
    monkeypatch.setattr(file_encoder, "trim_heap", lambda: trims.append(1))
    src = tmp_path / "in.txt"
    src.write_text((DATA / "tinystories_excerpt.txt").read_text(encoding="utf-8"), encoding="utf-8")
    encode_file(src, trained, tmp_path / "out.npy", num_workers=1, progress=False)
    assert len(trims) == len(file_encoder.chunk_bounds(str(src), 2048, trained.special_tokens)) > 10
    from smollm_stack.tokenizer.parallel import trim_heap

    trim_heap()  # the real one runs here (glibc) or does nothing (elsewhere), without an error


def test_special_token_outside_vocab_gets_next_id(tmp_path):
    # A special token the vocab lacks is appended as its bytes, and survives a save/load round trip.
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|eot|>"])
    assert tok.vocab[256] == b"<|eot|>" and tok.special_token_id("<|eot|>") == 256
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode("a<|eot|>b") == [97, 256, 98]


def test_save_load_round_trip(tmp_path, trained):
    trained.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "tokenizer_meta.json",
        "vocab.json",
    ]  # fmt: skip
    back = Tokenizer.load(tmp_path / "tok")
    assert back.vocab == trained.vocab and back.merges == trained.merges
    assert back.special_tokens == [EOT, EOT2] and back.special_token_id(EOT2) == 1
    text = VARIED[2] + EOT2 + VARIED[1]
    assert back.encode(text) == trained.encode(text)
    again = Tokenizer.from_files(tmp_path / "tok" / "vocab.json", tmp_path / "tok" / "merges.txt", [EOT, EOT2])
    assert again.vocab == trained.vocab


def corrupt(tok_dir, name, edit):
    path = tok_dir / name
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")


@pytest.mark.parametrize(
    "name, edit, error",
    [
        ("vocab.json", lambda s: s[: len(s) // 2], "not a valid vocab.json"),
        ("vocab.json", lambda s: s.replace('"Ġt": ', '"Ġ t": ', 1), "not in GPT-2's byte alphabet"),
        ("merges.txt", lambda s: s + "Ġt h e\n", "expected 'left right'"),
        ("merges.txt", lambda s: s + "zzzz q\n", "don't match"),
        ("tokenizer_meta.json", lambda s: s.replace('"version": 2', '"version": 7'), "version 2"),
        ("tokenizer_meta.json", lambda s: s.replace('"vocab_size": 600', '"vocab_size": 9'), "vocab_size 9"),
        ("tokenizer_meta.json", lambda s: s.replace(f'"{EOT2}"', f'"{EOT}"'), "meta.json: duplicate special"),
    ],
)
def test_corrupt_files(tmp_path, trained, name, edit, error):
    trained.save(tmp_path)
    corrupt(tmp_path, name, edit)
    with pytest.raises(ValueError, match=error):
        Tokenizer.load(tmp_path)


def test_version_1_directories_still_load(tmp_path, trained):
    """Version 1 kept the metadata in tokenizer.json (now Hugging Face's file): such a directory loads as before."""
    trained.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text(encoding="utf-8"))
    for name in ("tokenizer_meta.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).unlink()
    (tmp_path / "tokenizer.json").write_text(json.dumps({**meta, "version": 1}), encoding="utf-8")
    back = Tokenizer.load(tmp_path)
    assert back.vocab == trained.vocab and back.merges == trained.merges and back.special_tokens == [EOT, EOT2]


def test_bad_input(trained, tmp_path):
    with pytest.raises(ValueError, match="cannot decode id 600"):
        trained.decode([5, 600])
    with pytest.raises(ValueError, match="cannot decode id 600"):
        trained.decode(torch.tensor([5, 600]))
    assert trained.decode(i for i in [5, 6]) == trained.decode([5, 6]) == trained.decode(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="cannot decode id -1"):
        trained.decode([-1])
    with pytest.raises(TypeError, match="expected str"):
        trained.encode(b"bytes")
    with pytest.raises(ValueError, match="lone surrogate"):
        trained.encode("a\ud800")
    with pytest.raises(ValueError, match="not a special token"):
        trained.special_token_id("<|nope|>")
    with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="merge 0"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [(b"a", b"zz")])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok " * 10 + b"\xc3")
    with pytest.raises(ValueError, match="offset 30"):
        encode_file(bad, trained, tmp_path / "o.npy", num_workers=1, progress=False)


def test_cli_train_then_encode(tmp_path, capsys):
    corpus = str(DATA / "tinystories_excerpt.txt")
    assert main(["train", corpus, "--vocab-size", "400", "--special-token", EOT, "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "wall time" in out and "peak memory" in out and "longest token" in out
    assert main(["encode", corpus, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "c.npy")]) == 0
    tok = Tokenizer.load(tmp_path / "tok")
    assert np.load(tmp_path / "c.npy").tolist() == tok.encode(Path(corpus).read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "argv, error",
    [
        (["train", "missing.txt", "--vocab-size", "300", "--out", "x"], "no such file"),
        (["train", "{data}", "--vocab-size", "300", "--out", "x"], "is a directory"),
        (["train", "{data}/tinystories_excerpt.txt", "--vocab-size", "10", "--out", "x"], "smaller than 256"),
        (["encode", "{data}/tinystories_excerpt.txt", "--tokenizer", "nowhere", "--out", "x.npy"], "no tokenizer"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, error):
    monkeypatch.chdir(tmp_path)
    assert main([a.format(data=DATA) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and error in err[-1]


def test_hugging_face_reads_our_directories(tmp_path, trained):
    """Tokenizer.save writes HF's files too: AutoTokenizer and tokenizers give our ids, and decode round-trips."""
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    trained.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*VARIED, " " * 7 + "x\n\n\n" + "\t" * 3, "12,345.678 x2 3rd", EOT2 + EOT + EOT2]:
        ids = trained.encode(text)
        assert hf(text)["input_ids"] == ids and raw.encode(text).ids == ids, text
        assert hf.decode(ids) == text
    assert hf.eos_token_id == hf.bos_token_id == hf.pad_token_id == trained.special_token_id(EOT)
    assert Tokenizer.from_hf(tmp_path / "tokenizer.json").encode(VARIED[8]) == trained.encode(VARIED[8])


def test_a_directory_with_only_hugging_faces_file_loads(tmp_path, trained):
    trained.save(tmp_path / "ours")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/tokenizer.json").write_bytes((tmp_path / "ours/tokenizer.json").read_bytes())
    back = Tokenizer.load(tmp_path / "hf")
    assert back.vocab == trained.vocab and back.merges == trained.merges and back.special_tokens == [EOT, EOT2]
    spec = json.loads((tmp_path / "hf/tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFC"}
    (tmp_path / "hf/tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="no normalizer is supported"):
        Tokenizer.load(tmp_path / "hf")
