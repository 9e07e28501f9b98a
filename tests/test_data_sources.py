"""Corpora as they ship: jsonl, jsonl.gz, parquet, directories, globs and Hub datasets, to sharded token files.

Every corpus here is written by the test itself (parquet ones with pyarrow, the ``data`` extra); the Hub is a fake
cache read offline. Bad data must give one ``error:`` line naming the file and its line or row group, and leave
nothing that looks finished.
"""

import gzip
import json

import numpy as np
import pytest

from smollm_stack.tokenizer import Tokenizer
from smollm_stack.train.data import tokens as dataset
from smollm_stack.train.data.tokens import AlignedBatchSampler, BatchSampler, open_tokens, piece_starts, resolve_data
from smollm_stack.train.data.prepare import main as prepare_main
from smollm_stack.train.data.shards import MANIFEST, ShardedTokens, write_shards
from smollm_stack.train.data.sources import EOT, resolve
from tests.test_train_data import fake_hub

WORDS = ["fox", "cat", "owl", "bee", "ant", "elk"]
DOCS = [f"Once upon a time a little {w} found {n} red balls. Ünïcode too: 日本.\n" for n in range(12) for w in WORDS]


def as_jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write_jsonl(path, docs, field="text"):
    lines = as_jsonl(docs, field)
    path.write_bytes(gzip.compress(lines) if path.name.endswith(".gz") else lines)
    return path


def write_parquet(path, column, row_group_size=8, field="text"):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({field: column, "n": list(range(len(column)))}), path, row_group_size=row_group_size)
    return path


def as_text(docs) -> str:
    return "".join(d + EOT for d in docs)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A tokenizer with the 256 bytes, a few merges and <|endoftext|>, saved (so no test trains one it need not)."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    merges = [(b"t", b"h"), (b" ", b"a"), (b"o", b"n")]
    vocab = {i: bytes([i]) for i in range(256)} | {256 + i: a + b for i, (a, b) in enumerate(merges)}
    Tokenizer(vocab, merges, [EOT]).save(out)
    return out


def test_prepare_takes_jsonl_gz_and_parquet_shards_into_one_sharded_corpus(tmp_path, capsys):
    shards = tmp_path / "corpus"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", DOCS[:30])
    write_jsonl(shards / "part-1.jsonl.gz", DOCS[30:50])
    write_parquet(shards / "part-2.parquet", DOCS[50:])
    (shards / "README.md").write_text("not a shard: a directory's other files are skipped")
    write_jsonl(tmp_path / "val.jsonl", DOCS[::7])
    out = tmp_path / "out"
    argv = ["--train", str(shards), "--val", str(tmp_path / "val*.jsonl"), "--out", str(out), "--vocab-size", "300"]
    assert prepare_main(argv) == 0
    assert f"--train-data {out / 'train'} --val-data {out / 'val'}" in capsys.readouterr().out
    tok = Tokenizer.load(out / "tokenizer")
    manifest = json.loads((out / "train" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["tokenizer"] == dataset.tokenizer_digest(out / "tokenizer")
    assert [s["source"] for s in manifest["shards"]] == [str(p) for p in sorted(shards.glob("part-*"))]
    for shard, docs in zip(manifest["shards"], (DOCS[:30], DOCS[30:50], DOCS[50:])):
        ids = np.load(out / "train" / shard["file"])
        assert ids.dtype == np.uint16 and ids.tolist() == tok.encode(as_text(docs)) and shard["tokens"] == len(ids)
    train = open_tokens(out / "train", vocab_size=len(tok))
    assert train[:].tolist() == tok.encode(as_text(DOCS)) and len(train) == sum(s["tokens"] for s in manifest["shards"])
    assert prepare_main(argv) == 2 and "--force" in capsys.readouterr().err  # a finished prepare is not redone
    (shards / "part-0.jsonl").unlink()
    assert prepare_main([*argv, "--force"]) == 0  # ... but replaced, with the shard of a source now gone removed
    assert sorted(p.name for p in (out / "train").iterdir()) == [MANIFEST, "shard-00000.npy", "shard-00001.npy"]


def test_a_sharded_corpus_is_sampled_exactly_as_the_same_tokens_in_one_file():
    data = np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint16)
    cuts = [0, 1, 700, 701, 3000, 5000]  # a one-token shard, and windows that span several shards
    sharded = ShardedTokens([data[a:b] for a, b in zip(cuts, cuts[1:])])
    assert len(sharded) == len(data) and sharded[:].tolist() == data.tolist() and sharded[-1] == data[-1]
    for a, b in [(0, 5000), (699, 702), (650, 3100), (4999, 5000), (10, 10)]:
        assert sharded[a:b].tolist() == data[a:b].tolist()
    one, many = BatchSampler(data, 4, 64, 7, 3), BatchSampler(sharded, 4, 64, 7, 3)
    for step in (0, 5):
        for slot in range(3):
            for a, b in zip(one.batch(step, slot, "cpu"), many.batch(step, slot, "cpu")):
                assert a.tolist() == b.tolist()
    assert piece_starts(sharded, 3, 64).tolist() == piece_starts(data, 3, 64).tolist()
    aligned = AlignedBatchSampler(sharded, 4, 64, 7, 3, eot_id=3)
    assert aligned.starts(2).tolist() == AlignedBatchSampler(data, 4, 64, 7, 3, eot_id=3).starts(2).tolist()


def test_offsets_past_two_to_the_31_tokens():
    big = 1 << 31
    first = np.broadcast_to(np.uint16(1), (big - 3,))  # 4 GiB of tokens that take no memory
    sharded = ShardedTokens([first, np.arange(2, 12, dtype=np.uint16), np.broadcast_to(np.uint16(9), (big,))])
    assert len(sharded) == 2 * big + 7 and sharded.offsets.dtype == np.int64
    assert sharded[big - 5 : big + 2].tolist() == [1, 1, 2, 3, 4, 5, 6]
    assert sharded[big + 5 : big + 8].tolist() == [10, 11, 9]
    starts = BatchSampler(sharded, 64, 8, 0, 1).starts(0)
    assert starts.max() > big  # the draw covers the tokens past 2**31
    x, y = BatchSampler(sharded, 64, 8, 0, 1).batch(0, 0, "cpu")
    assert x[:, 1:].tolist() == y[:, :-1].tolist()


def test_a_stopped_prepare_resumes_and_a_changed_source_is_noticed(tmp_path, byte_tok, capsys):
    parts = [write_jsonl(tmp_path / f"p{i}.jsonl", DOCS[10 * i : 10 * i + 10]) for i in range(3)]
    good = parts[1].read_bytes()
    parts[1].write_bytes(good + b'{"text": "bad \xff byte"}\n')
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=f"{parts[1]} line 11 is not valid UTF-8"):
        write_shards(parts, byte_tok, out, progress=False)
    assert [p.name for p in sorted(out.iterdir())] == [MANIFEST, "shard-00000.npy"]  # no half-written shard
    with pytest.raises(ValueError, match="half-finished prepare"):
        open_tokens(out)
    parts[1].write_bytes(good)
    capsys.readouterr()
    write_shards(parts, byte_tok, out, progress=False)
    assert "p0.jsonl" not in capsys.readouterr().out  # kept, not encoded again
    tok = Tokenizer.load(byte_tok)
    assert open_tokens(out)[:].tolist() == tok.encode(as_text(DOCS[:30]))
    write_jsonl(parts[0], DOCS[:9])
    with pytest.raises(ValueError, match=f"{parts[0]} changed since it was encoded"):
        write_shards(parts, byte_tok, out, progress=False)
    write_shards(parts[:2], byte_tok, out, force=True, progress=False)
    assert open_tokens(out)[:].tolist() == tok.encode(as_text(DOCS[:9] + DOCS[10:20]))
    assert not (out / "shard-00002.npy").exists()  # a forced rerun with fewer sources removes the shard it dropped


def _bad_parquet(tmp_path, case):
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "bad.parquet"
    if case == "int column":
        return write_parquet(path, list(range(20))), "column 'text' is int64"
    if case == "null":
        return write_parquet(path, DOCS[:12] + [None] + DOCS[:3]), "row group 1: column 'text' has 1 missing"
    offsets = np.arange(0, 5 * 17, 5, dtype=np.int32)  # 16 strings of 5 bytes, the 10th one not UTF-8
    raw = bytearray(b"hello" * 16)
    raw[47] = 0xFF
    column = pa.Array.from_buffers(pa.string(), 16, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(bytes(raw))])
    return write_parquet(path, column), "row group 1: "


@pytest.mark.parametrize(
    "case",
    ["invalid utf-8", "no text field", "not json", "empty shard", "truncated gz", "corrupt gz"]
    + ["int column", "null", "parquet utf-8"],
)
def test_bad_data_is_one_error_line_naming_file_and_place_and_nothing_looks_finished(tmp_path, byte_tok, case, capsys):
    from tests.test_faults import one_error

    path, needle = tmp_path / "bad.jsonl", None
    if case == "invalid utf-8":
        path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        needle = "line 2 is not valid UTF-8"
    elif case == "no text field":
        write_jsonl(path, DOCS[:3], field="body")
        needle = "line 1 has no string field 'text'"
    elif case == "not json":
        path.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": \n')
        needle = "line 3 is not JSON"
    elif case == "empty shard":
        path.write_bytes(b"\n")
        needle = "holds no documents"
    elif case in ("truncated gz", "corrupt gz"):
        path = write_jsonl(tmp_path / "bad.jsonl.gz", DOCS)
        data = bytearray(path.read_bytes())
        if case == "corrupt gz":
            data[30] ^= 0xFF  # inside the deflate stream: zlib's own error, not an OSError
        path.write_bytes(bytes(data if case == "corrupt gz" else data[:-30]))
        needle = "cannot read it"
    else:
        path, needle = _bad_parquet(tmp_path, case)
    write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = tmp_path / "out"
    argv = ["--train", str(tmp_path / "good.jsonl"), "--val", str(path), "--out", str(out)]
    assert prepare_main([*argv, "--tokenizer", str(byte_tok)]) == 2
    one_error(capsys, str(path), needle)
    assert not json.loads((out / "val" / MANIFEST).read_text())["complete"]
    assert not list((out / "val").glob("*.npy")) and not list((out / "val").glob("*.tmp-*"))
    if case == "invalid utf-8":  # fixed, the same command finishes what it started, without --force
        write_jsonl(path, DOCS[:4])
        assert prepare_main([*argv, "--tokenizer", str(byte_tok)]) == 0
        assert open_tokens(out / "val")[:].tolist() == Tokenizer.load(byte_tok).encode(as_text(DOCS[:4]))


def test_a_hub_dataset_is_read_from_the_cache_offline(tmp_path, monkeypatch):
    files = {f"data/{split}-00000-of-00001.jsonl": as_jsonl(DOCS[:5]) for split in ("train", "validation")}
    snapshot = fake_hub(tmp_path / "hub", "org/tiny-corpus", files, monkeypatch)
    assert resolve("hf:org/tiny-corpus:data/train-*") == [snapshot / "data" / "train-00000-of-00001.jsonl"]
    assert resolve("hf:org/tiny-corpus:*.jsonl") == sorted((snapshot / "data").iterdir())  # * crosses "/", as the Hub's
    with pytest.raises(ValueError, match="cannot fetch hf:org/missing:data/"):
        resolve("hf:org/missing:data/*")
    with pytest.raises(ValueError, match="no file of org/tiny-corpus matches data/test-"):
        resolve("hf:org/tiny-corpus:data/test-*")
    with pytest.raises(ValueError, match="a Hub dataset is hf:OWNER/NAME"):
        resolve("hf:tiny-corpus")


def test_the_trainer_data_flags_take_a_source_and_cache_its_shards(tmp_path, byte_tok, monkeypatch, capsys):
    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / "cache"))
    write_parquet(tmp_path / "train.parquet", DOCS)
    write_jsonl(tmp_path / "val.jsonl.gz", DOCS[:9])
    specs = (str(tmp_path / "train.parquet"), str(tmp_path / "*.jsonl.gz"), str(byte_tok))
    train, val, tok_dir = resolve_data(*specs, vocab_size=300, progress=False)
    assert (train / MANIFEST).is_file() and tok_dir == byte_tok
    assert open_tokens(val)[:].tolist() == Tokenizer.load(byte_tok).encode(as_text(DOCS[:9]))
    capsys.readouterr()
    assert resolve_data(*specs, vocab_size=300, progress=False) == (train, val, tok_dir)
    assert "encoding" not in capsys.readouterr().out  # the second run finds its shards in the cache


def test_the_text_field_is_chosen_recorded_and_a_changed_one_is_noticed(tmp_path, byte_tok, monkeypatch, capsys):
    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / "cache"))
    write_parquet(tmp_path / "a.parquet", DOCS[:20], field="content")
    write_jsonl(tmp_path / "b.jsonl", DOCS[20:30], field="content")
    out, sources = tmp_path / "out", ["--train", str(tmp_path / "a.parquet"), "--val", str(tmp_path / "b.jsonl")]
    assert prepare_main([*sources, "--out", str(out), "--tokenizer", str(byte_tok)]) == 2
    assert "a.parquet has no column 'text' (its columns: content, n; --text-field" in capsys.readouterr().err
    assert prepare_main([*sources, "--out", str(out), "--tokenizer", str(byte_tok), "--text-field", "content"]) == 0
    tok = Tokenizer.load(byte_tok)
    assert open_tokens(out / "val")[:].tolist() == tok.encode(as_text(DOCS[20:30]))
    assert json.loads((out / "val" / MANIFEST).read_text())["text_field"] == "content"
    with pytest.raises(ValueError, match="encoded from the field 'content', not 'body'"):
        write_shards([tmp_path / "b.jsonl"], byte_tok, out / "val", progress=False, field="body")
    specs = (str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl"))  # the trainer's flags: a field of its own
    train, val, tok_dir = resolve_data(*specs, None, vocab_size=300, progress=False, field="content")
    assert open_tokens(val)[:].tolist() == Tokenizer.load(tok_dir).encode(as_text(DOCS[20:30]))
    assert tok_dir.name.endswith(dataset._field_key([tmp_path / "a.parquet"], "content"))  # its own cache entry


def test_the_scale_benchmark_cuts_a_corpus_into_shards_of_whole_documents(tmp_path):
    pytest.importorskip("pyarrow")
    from smollm_stack.bench.data import cut_into_shards
    from smollm_stack.train.data.sources import text_batches

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{d}\n{EOT}\n" for d in DOCS))
    shards = cut_into_shards(corpus, 3, tmp_path / "shards")
    assert [p.name for p in shards] == ["part-000.jsonl.gz", "part-001.parquet", "part-002.jsonl.gz"]
    text = b"".join(b for p in shards for b in text_batches(p, batch_bytes=100)).decode()
    assert text == as_text(d.strip("\n") for d in DOCS)


def test_parquet_without_pyarrow_is_one_error_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    from tests.test_faults import one_error

    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    argv = ["--train", str(tmp_path / "a.parquet"), "--val", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o")]
    assert prepare_main(argv) == 2
    one_error(capsys, "a.parquet needs pyarrow", "pip install 'smollm-stack[data]'")
    assert not (tmp_path / "o").exists()


def test_a_manifest_naming_files_outside_its_shards_is_refused(tmp_path, byte_tok):
    """A planted manifest must not make us read, or with --force remove, a file that is not one of its shards."""
    outside = tmp_path / "precious.npy"
    np.save(outside, np.arange(10, dtype=np.uint16))
    out = tmp_path / "shards"
    out.mkdir()
    shards = [{"file": "../precious.npy", "tokens": 10, "bytes": outside.stat().st_size, "source": "x"}]
    (out / MANIFEST).write_text(json.dumps({"format": "smollm-token-shards", "complete": True, "shards": shards}))
    with pytest.raises(ValueError, match="names a shard '../precious.npy'"):
        open_tokens(out)
    with pytest.raises(ValueError, match="not a shard manifest of ours"):
        write_shards([write_jsonl(tmp_path / "a.jsonl", DOCS[:2])], byte_tok, out, force=True, progress=False)
    assert outside.is_file()
