"""BPE training: the GPT-2 scanner against `regex`, safe chunking, and the Numba trainer against the pure-Python
reference on several corpora (real text, unicode-heavy, heavy ties, vocab beyond the possible merges, 1 vs N workers).
"""

import random
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from smollm_stack.tokenizer import train_bpe
from smollm_stack.tokenizer import trainer as trainer_module
from smollm_stack.tokenizer.parallel import chunk_bounds
from smollm_stack.tokenizer.pretokenize import GPT2_PATTERN, pretokenize
from smollm_stack.tokenizer.reference import split_special, train_bpe_reference

DATA = Path(__file__).parent / "data"
EOT = "<|endoftext|>"
# characters that exercise every branch of the scanner: contractions, each class, odd whitespace, multi-byte UTF-8
TRICKY = list("ab 'sdmtlrvE\n\t\r  19２٣é中ǅ😀!.,-\u00a0\u2028\u3000\u0085\x1c")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(TRICKY), max_size=30) | st.text(max_size=30))
def test_scanner_matches_regex(text):
    assert pretokenize(text) == regex.findall(GPT2_PATTERN, text)


def test_scanner_examples():
    assert pretokenize("I've  got 42!!\n") == ["I", "'ve", " ", " got", " 42", "!!", "\n"]
    assert pretokenize("") == []
    assert pretokenize("   ") == ["   "]
    assert pretokenize(" 'll x \n\ny") == [" '", "ll", " x", " \n", "\n", "y"]


def write(tmp_path, text, name="corpus.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def unicode_text(seed=0, n_words=3000):
    rng = random.Random(seed)
    syllables = ["été", "ça", "naïve", "中文", "日本", "😀", "🎉x", "über", "Ω", "ǅa", " ", "\n", "'s", "123", "٣٤"]
    return "".join(rng.choice(syllables) + rng.choice(["", " ", " ", ", ", "\n"]) for _ in range(n_words))


def tie_text(seed=0):
    # every word once, shuffled: all pair counts start equal, so nearly every merge is decided by the tie-break
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdxyz") for _ in range(rng.randint(2, 6))) for _ in range(400)]
    return " ".join(sorted(set(words)))


CORPORA = {
    "tinystories": (lambda: (DATA / "tinystories_excerpt.txt").read_text(encoding="utf-8"), 500, [EOT]),
    "unicode": (unicode_text, 420, [EOT, "<|pad|>"]),
    "ties": (tie_text, 330, []),
    "vocab_beyond_merges": (lambda: "aaab ab ba abab\n", 400, [EOT]),
    "empty": (lambda: "", 300, [EOT]),
}


@pytest.mark.parametrize("jit", [True, False], ids=["numba", "python"])
@pytest.mark.parametrize("name", CORPORA)
def test_train_matches_reference(tmp_path, name, jit):
    make, vocab_size, specials = CORPORA[name]
    text = make()
    expected = train_bpe_reference(text, vocab_size, specials)
    got = train_bpe(write(tmp_path, text), vocab_size, specials, num_workers=1, jit=jit)
    assert got[1] == expected[1]
    assert got[0] == expected[0]
    if name in ("vocab_beyond_merges", "empty"):
        assert len(got[0]) < vocab_size


def test_tie_break_compares_pairs_not_concatenations(tmp_path):
    # merges (b, d) then (a, b) leave (ab, c) and (a, bd) tied at 2: as tuples (b"ab", b"c") > (b"a", b"bd")
    # because b"ab" > b"a", although the concatenation b"abc" < b"abd"
    text = "abd\nabd\nabc\nabc\nbd\nbd\nbd\nbd\nab"
    for jit in (True, False):
        vocab, merges = train_bpe(write(tmp_path, text), 256 + 3, [], num_workers=1, jit=jit)
        assert merges == [(b"b", b"d"), (b"a", b"b"), (b"ab", b"c")]
    assert merges == train_bpe_reference(text, 256 + 3)[1]


@pytest.mark.parametrize("jit", [True, False], ids=["numba", "python"])
def test_special_tokens_are_never_merged_or_counted(tmp_path, jit):
    text = f"hi{EOT}hi{EOT}{EOT}hi"
    vocab, merges = train_bpe(write(tmp_path, text), 300, [EOT], num_workers=1, jit=jit)
    assert vocab[0] == EOT.encode()
    assert all(b"<" not in a + b and b"|" not in a + b for a, b in merges)
    assert merges == [(b"h", b"i")]


def test_one_vs_many_workers_identical(tmp_path, monkeypatch):
    text = (DATA / "tinystories_excerpt.txt").read_text(encoding="utf-8") + unicode_text(1)
    path = write(tmp_path, text)
    monkeypatch.setattr(trainer_module, "MIN_CHUNK_BYTES", 4096)  # force many chunks
    assert len(chunk_bounds(str(path), 4096, [EOT])) > 10
    assert train_bpe(path, 600, [EOT], num_workers=3, jit=True) == train_bpe(path, 600, [EOT], num_workers=1, jit=True)


def test_a_small_input_trains_in_python_until_the_jit_is_loaded(tmp_path, monkeypatch):
    """A fresh install's first call must not wait for Numba to compile: small files take small.py's path."""
    path = write(tmp_path, "low lower lowest\n" * 50)

    def numba_path(*args, **kwargs):
        raise AssertionError("the Numba path was taken")

    monkeypatch.setattr(trainer_module, "count_file", numba_path)
    monkeypatch.setattr(trainer_module, "merge_loop", type("Cold", (), {"signatures": []})())
    assert train_bpe(path, 260, [EOT])[1] == train_bpe_reference(path.read_text(), 260, [EOT])[1]
    monkeypatch.setattr(trainer_module, "SMALL_BYTES", path.stat().st_size - 1)
    with pytest.raises(AssertionError, match="Numba path"):
        train_bpe(path, 260, [EOT])


def test_chunks_cut_where_pretokens_do_not_change(tmp_path):
    # specials with a space inside, one starting with a newline, and whitespace runs everywhere: a cut inside any
    # of them would change the pre-tokens
    specials = [EOT, "<|end of doc|>", "\n<|x|>"]
    parts = ["ab", " ", "  ", "\n", "x\n", " \n ", "é", "!", *specials, "<|end", " of doc|>"]

    def pieces(text):
        return [p for c in split_special(text, specials) for p in ([c] if c in specials else pretokenize(c))]

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 60)))
        path = write(tmp_path, text)
        raw = path.read_bytes()
        bounds = chunk_bounds(str(path), rng.randint(1, 20), specials)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(raw)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert [p for s, e in bounds for p in pieces(raw[s:e].decode("utf-8"))] == pieces(text)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(vocab_size=255 + 1, special_tokens=[EOT]), "smaller than 256"),
        (dict(vocab_size=300, special_tokens=[""]), "non-empty"),
        (dict(vocab_size=300, special_tokens=[EOT, EOT]), "duplicate"),
        (dict(vocab_size=300.0, special_tokens=[]), "must be an int"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        train_bpe(write(tmp_path, "hello"), **kwargs)


def test_bad_paths_and_bytes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_bpe(tmp_path / "missing.txt", 300, [])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        train_bpe(tmp_path, 300, [])
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo".encode() + b"\xff rest")
    with pytest.raises(ValueError, match="not valid UTF-8: byte 0xff at offset 6"):
        train_bpe(bad, 300, [])
