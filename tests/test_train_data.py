"""Data preparation: text -> tokenizer + .npy splits, and the download plumbing (on file:// URLs, no network)."""

import gzip

import numpy as np
import pytest

from smollm_stack.tokenizer import Tokenizer
from smollm_stack.train.data.tokens import open_tokens
from smollm_stack.train.data.download import CORPORA, download
from smollm_stack.train.data.prepare import main as prepare_main

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
def test_download_fetches_through_the_hub_cache_and_renames(tmp_path, monkeypatch, compressed):
    name = "src.txt.gz" if compressed else "src.txt"
    fake_hub(tmp_path / "hub", "org/stories", {name: gzip.compress(STORY.encode()) if compressed else STORY.encode()},
             monkeypatch)  # fmt: skip
    out = download("org/stories", name, tmp_path / "data" / "train.txt")
    assert out.read_text() == STORY and [p.name for p in out.parent.iterdir()] == ["train.txt"]
    with pytest.raises(ValueError, match="cannot fetch org/stories/missing.txt"):
        download("org/stories", "missing.txt", tmp_path / "data" / "valid.txt")
    assert not (tmp_path / "data" / "valid.txt").exists()
    assert all(repo.count("/") == 1 and name.endswith((".txt", ".txt.gz")) for c in CORPORA.values()
               for repo, name in c.values())  # fmt: skip


def fake_hub(root, repo_id: str, files: dict, monkeypatch):
    """A Hugging Face cache holding ``files`` ({path: bytes}) of dataset ``repo_id`` at main, read offline."""
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for path, data in files.items():
        (repo / "snapshots" / commit / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / path).write_bytes(data)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit
