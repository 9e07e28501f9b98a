"""`smollm lm` on untrusted files (issue 28): a damaged checkpoint is refused with the run's newest intact one
offered and nothing in the run touched; links planted at our output names are refused, their targets untouched;
a model vocabulary padded beyond the tokenizer's samples only the tokenizer's ids."""

import dataclasses

import torch

from smollm_stack.model import ModelConfig, TransformerLM
from smollm_stack.train.store import checkpoint
from smollm_stack.train.lm import main
from test_model_cli import error_of, make_tokenizer, run_dir  # noqa: F401 (run_dir: a fixture)


def save_with_checksum(path, **overrides):
    """A checkpoint as the trainer writes it: with an optimizer, its model_config and a .sha256 sidecar."""
    torch.manual_seed(0)
    kwargs = dict(vocab_size=260, context_length=32, d_model=32, num_layers=1, num_heads=4, backend="eager")
    model = TransformerLM(ModelConfig(**{**kwargs, **overrides}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save_checkpoint(model, optimizer, 1, path, model_config=dataclasses.asdict(model.config))


def flip_a_byte(path):
    """Flip one byte inside the tensors' data: torch.load still reads the file, only its checksum tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_damaged_checkpoint_is_refused_and_the_newest_intact_one_offered(tmp_path, capsys):
    run = tmp_path / "run"
    make_tokenizer(run / "tokenizer")
    for name in ("ckpt_000001.pt", "ckpt_000002.pt", "ckpt_000003.pt"):
        save_with_checksum(run / name)
    flip_a_byte(run / "ckpt_000002.pt")
    flip_a_byte(run / "ckpt_000003.pt")
    before = snapshot(run)
    for argv in (["sample", "--prompt", "the"], ["export-hf", "--out", str(tmp_path / "hf")]):
        err = error_of([*argv, "--run", str(run)], capsys)
        assert "ckpt_000003.pt is damaged" in err and f"add --checkpoint {run / 'ckpt_000001.pt'} to use" in err
        chosen = ["--checkpoint", str(run / "ckpt_000002.pt")]  # chosen within the run: refused all the same
        assert "ckpt_000002.pt is damaged" in error_of([*argv, "--run", str(run), *chosen], capsys)
        alone = ["--checkpoint", str(run / "ckpt_000003.pt"), "--tokenizer", str(run / "tokenizer")]
        err = error_of([*argv, *alone], capsys)
        assert "ckpt_000003.pt is damaged: its SHA-256 differs" in err and "--run" not in err
    assert not (tmp_path / "hf").exists()
    assert main(["sample", "--run", str(run), "--checkpoint", str(run / "ckpt_000001.pt"), "--prompt", "the"]) == 0
    capsys.readouterr()
    assert snapshot(run) == before  # readers never write into the run: nothing renamed, set aside or added
    flip_a_byte(run / "ckpt_000001.pt")
    assert "it has no intact one" in error_of(["sample", "--run", str(run), "--prompt", "the"], capsys)


def test_export_refuses_links_at_its_names_and_a_linked_out(run_dir, tmp_path, capsys):  # noqa: F811
    victim = tmp_path / "victim.json"
    victim.write_text("mine")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "vocab.json").symlink_to(victim)  # moved in last: the check comes first
    argv = ["export-hf", "--run", str(run_dir), "--force"]
    assert f"{out / 'vocab.json'} is a symbolic link" in error_of([*argv, "--out", str(out)], capsys)
    assert victim.read_text() == "mine" and (out / "vocab.json").is_symlink()
    assert [p.name for p in out.iterdir()] == ["vocab.json"]  # a refusal moves no file in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run", "victim.json"]  # no staging left behind
    elsewhere, linked = tmp_path / "elsewhere", tmp_path / "linked"
    elsewhere.mkdir()
    linked.symlink_to(elsewhere)
    for flags in ([], ["--force"]):
        err = error_of(["export-hf", "--run", str(run_dir), "--out", str(linked), *flags], capsys)
        assert f"{linked} is a symbolic link" in err
    assert list(elsewhere.iterdir()) == []


def test_import_refuses_a_link_at_its_out(run_dir, tmp_path, capsys):  # noqa: F811
    assert main(["export-hf", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    victim, out = tmp_path / "victim.pt", tmp_path / "back" / "ckpt.pt"
    victim.write_text("mine")
    out.parent.mkdir()
    out.symlink_to(victim)
    argv = ["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(out), "--force"]
    assert f"{out} is a symbolic link" in error_of(argv, capsys)
    assert victim.read_text() == "mine" and out.is_symlink()


def test_sample_with_a_vocabulary_padded_beyond_the_tokenizer(tmp_path, capsys):
    """The trainer pads (--vocab-size 4096 over a 260-token tokenizer); here the padded ids are the likeliest."""
    tok = make_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=320, context_length=32, d_model=32, num_layers=1, num_heads=4, backend="eager")
    model = TransformerLM(config)
    with torch.no_grad():
        model.lm_head.weight[: len(tok)] = 0  # every real id's logit is 0, some padded one's is above
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(config)}, tmp_path / "ckpt.pt")
    argv = ["sample", "--checkpoint", str(tmp_path / "ckpt.pt"), "--tokenizer", str(tmp_path / "tokenizer")]
    assert main([*argv, "--prompt", "the", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "the" + "\x00" * 5 + "\n"  # argmax over the real ids: the first, byte 0
    assert main([*argv, "--prompt", "the", "--prompt", "a", "--max-new-tokens", "8", "--seed", "1"]) == 0


def test_an_output_another_writer_creates_meanwhile_is_never_replaced(run_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Without --force the outputs are created exclusively: one that appears after the early check (another
    writer racing us) makes us fail, and what it wrote stays."""
    from smollm_stack.train import lm

    assert main(["export-hf", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    hf_out, ckpt_out = tmp_path / "theirs", tmp_path / "theirs.pt"

    def racing(load):  # the other writer creates both outputs while we load
        def load_then_race(*args):
            loaded = load(*args)
            hf_out.mkdir()
            (hf_out / "config.json").write_text("theirs")
            ckpt_out.write_text("theirs")
            return loaded

        return load_then_race

    monkeypatch.setattr(lm, "load_pair", racing(lm.load_pair))
    assert f"{hf_out} already exists" in error_of(["export-hf", "--run", str(run_dir), "--out", str(hf_out)], capsys)
    assert [p.name for p in hf_out.iterdir()] == ["config.json"] and (hf_out / "config.json").read_text() == "theirs"
    (hf_out / "config.json").unlink()
    hf_out.rmdir()
    ckpt_out.unlink()
    monkeypatch.setattr(lm, "import_hf", racing(lm.import_hf))
    argv = ["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(ckpt_out), "--tokenizer-out", str(hf_out)]
    assert f"{ckpt_out} already exists" in error_of(argv, capsys)
    assert ckpt_out.read_text() == "theirs"
