"""Data preparation: text -> tokenizer + .npy splits, and the download plumbing (on file:// URLs, no network)."""

import gzip

import numpy as np
import pytest

from smollm_stack.tokenizer import Tokenizer
from smollm_stack.train.dataset import open_tokens
from smollm_stack.train.download import CORPORA, download
from smollm_stack.train.prepare import main as prepare_main

STORY = "Once upon a time, a little fox found a red ball. She was happy and played all day.\n<|endoftext|>\n"


def test_prepare_writes_tokenizer_and_splits(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(STORY * 50)
    (tmp_path / "valid.txt").write_text(STORY.replace("fox", "cat") * 5)
    out = tmp_path / "out"
    argv = ["--train", str(tmp_path / "train.txt"), "--val", str(tmp_path / "valid.txt"), "--out", str(out)]
    assert prepare_main([*argv, "--vocab-size", "280"]) == 0
    tok = Tokenizer.load(out / "tokenizer")
    assert len(tok) == 280
    for split, text in (("train", STORY * 50), ("val", STORY.replace("fox", "cat") * 5)):
        ids = open_tokens(out / f"{split}.npy", vocab_size=len(tok))
        assert ids.dtype == np.uint16 and ids.tolist() == tok.encode(text)
    assert f"--tokenizer {out / 'tokenizer'}" in capsys.readouterr().out
    assert prepare_main(["--train", str(tmp_path / "nope.txt"), "--val", "x", "--out", str(out)]) == 2
    assert "error: data file not found" in capsys.readouterr().err


@pytest.mark.parametrize("compressed", [False, True])
def test_download_streams_and_renames(tmp_path, compressed):
    source = tmp_path / ("src.txt.gz" if compressed else "src.txt")
    source.write_bytes(gzip.compress(STORY.encode()) if compressed else STORY.encode())
    out = download(source.as_uri(), tmp_path / "data" / "train.txt", progress=False)
    assert out.read_text() == STORY and [p.name for p in out.parent.iterdir()] == ["train.txt"]
    assert all(url.startswith("https://huggingface.co/datasets/") for urls in CORPORA.values() for url in urls.values())
