"""The trainer's building blocks against direct computations: AdamW, cosine_lr, clip_grad_norm, batches, checkpoints."""

import dataclasses
import io
import math
import os

import numpy as np
import pytest
import torch

import smollm_stack.train.store.checkpoint
from smollm_stack.model import ModelConfig
from smollm_stack.train import AdamW, clip_grad_norm, cosine_lr, get_batch, load_checkpoint, save_checkpoint
from smollm_stack.train.store.checkpoint import read_checkpoint, set_rng_state
from smollm_stack.train.store.rundir import RunDir
from smollm_stack.train.cli import parse_args, read_toml
from smollm_stack.train.config import make_config
from smollm_stack.train.data.tokens import BatchSampler, eval_starts, open_tokens


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_over_1000_steps(weight_decay):
    ours, theirs = _params(), _params()
    kwargs = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt_ours, opt_theirs = AdamW(ours, **kwargs), torch.optim.AdamW(theirs, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(1000):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
            if i == 1 and step % 7 == 0:  # a parameter that sometimes gets no gradient falls behind in t
                p.grad = q.grad = None
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert not torch.equal(ours[0], _params()[0])  # it did move


def test_adamw_decay_is_decoupled():
    # A zero gradient leaves Adam's moments at zero: the whole update is then p * (1 - lr * wd), nothing else.
    (p,) = [torch.nn.Parameter(torch.ones(3))]
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95))


def test_cosine_lr():
    max_lr, min_lr, warmup, cycle = 1.0, 0.1, 10, 110
    assert cosine_lr(0, max_lr, min_lr, warmup, cycle) == 0.0
    assert cosine_lr(5, max_lr, min_lr, warmup, cycle) == pytest.approx(0.5)
    assert cosine_lr(10, max_lr, min_lr, warmup, cycle) == pytest.approx(1.0)
    assert cosine_lr(60, max_lr, min_lr, warmup, cycle) == pytest.approx(0.55)  # half way: the mean of max and min
    assert cosine_lr(35, max_lr, min_lr, warmup, cycle) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(110, max_lr, min_lr, warmup, cycle) == pytest.approx(0.1)
    assert cosine_lr(500, max_lr, min_lr, warmup, cycle) == 0.1


@pytest.mark.parametrize("max_norm", [1e-2, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, theirs = _params(), _params()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        q.grad = p.grad.clone()
    norm = clip_grad_norm(ours + [torch.nn.Parameter(torch.ones(2))], max_norm)  # a parameter without grad is skipped
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected)
    direct = torch.sqrt(sum((q.grad**2).sum() for q in theirs))  # after clipping
    assert direct.item() == pytest.approx(min(max_norm, expected.item()), rel=1e-5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


def test_get_batch_covers_every_valid_start(tmp_path):
    data = np.arange(20, dtype=np.uint16)
    np.save(tmp_path / "d.npy", data)
    data = open_tokens(tmp_path / "d.npy")  # a memmap
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        x, y = get_batch(data, 4, 16, "cpu")
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        torch.testing.assert_close(y[:, :-1], x[:, 1:])
        torch.testing.assert_close(y[:, -1], x[:, -1] + 1)
        seen.update(x[:, 0].tolist())
    assert seen == {0, 1, 2, 3}  # starts 0..len-T-1: each one, and none past it


def test_sampler_global_batch_is_the_same_however_split():
    data = np.arange(1000)
    one = BatchSampler(data, 8, 10, seed=3, slots=1)
    split = BatchSampler(data, 2, 10, seed=3, slots=4)  # e.g. 2 ranks x 2 micro-batches
    for step in (1, 7):
        x_one, _ = one.batch(step, 0, "cpu")
        x_split = torch.cat([split.batch(step, s, "cpu")[0] for s in range(4)])
        torch.testing.assert_close(x_one, x_split)
    assert not torch.equal(one.batch(1, 0, "cpu")[0], one.batch(2, 0, "cpu")[0])


def test_eval_starts():
    assert eval_starts(100, 10, 0).tolist() == list(range(0, 90, 10))  # tiles the split, last start 89 at most
    spread = eval_starts(1000, 10, 5)
    assert spread[0] == 0 and spread[-1] == 989 and len(spread) == 5


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("to_file_object", [False, True])
def test_checkpoint_round_trip(tmp_path, to_file_object):
    model, optimizer = _model_and_optimizer(0)
    out = io.BytesIO() if to_file_object else tmp_path / "ckpt.pt"
    save_checkpoint(model, optimizer, 17, out, sampler={"seed": 1})
    if to_file_object:
        out.seek(0)
    other, other_opt = _model_and_optimizer(1)
    assert load_checkpoint(out, other, other_opt) == 17
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(other_opt.state_dict(), optimizer.state_dict(), atol=0, rtol=0)


def test_checkpoint_strips_compile_prefix_and_restores_rng(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    save_checkpoint(model, optimizer, 3, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3))  # the draws that follow the saved RNG states
    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)  # everything in it is weights_only-safe
    checkpoint["model"] = {"_orig_mod." + k: v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "compiled.pt")
    other, _ = _model_and_optimizer(1)
    assert load_checkpoint(tmp_path / "compiled.pt", other) == 3
    torch.testing.assert_close(other[0].weight, model[0].weight)

    set_rng_state(checkpoint["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer(0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, optimizer, 1, path)
    good = path.read_bytes()

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed mid-save

    monkeypatch.setattr(smollm_stack.train.store.checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, optimizer, 2, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.sha256"]  # no partial file left behind
    assert read_checkpoint(path)["iteration"] == 1


def test_prune_keeps_the_last_k_of_its_own_and_nothing_else(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "ckpt_000001.pt").touch()  # the user's, never recorded: pruning leaves it
    for it in (5, 10, 100, 1000):
        (tmp_path / f"ckpt_{it:06d}.pt").touch()
        run.record(tmp_path / f"ckpt_{it:06d}.pt")
    run.prune(2)
    assert [p.name for p in run.checkpoints()] == ["ckpt_000001.pt", "ckpt_000100.pt", "ckpt_001000.pt"]
    assert run.written_checkpoints() == ["ckpt_000100.pt", "ckpt_001000.pt"]


def test_open_tokens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="token file not found"):
        open_tokens(tmp_path / "missing.npy")
    np.save(tmp_path / "2d.npy", np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        open_tokens(tmp_path / "2d.npy")
    np.save(tmp_path / "ids.npy", np.array([1, 2, 300], dtype=np.uint16))
    with pytest.raises(ValueError, match="token id 300 but the vocabulary has 256"):
        open_tokens(tmp_path / "ids.npy", vocab_size=256)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        open_tokens(tmp_path / "junk.npy")
    with pytest.raises(ValueError, match="too few for one sequence"):
        get_batch(np.arange(10), 2, 10, "cpu")


def test_config_flags_toml_and_resume(tmp_path):
    cfg = parse_args(["--batch-size", "4", "--d-model", "64", "--norm", "post", "--no-progress", "--compile"])
    assert cfg.training.batch_size == 4 and cfg.model.args == {"d_model": 64, "norm": "post"}
    assert (
        cfg.logging.progress is False
        and cfg.system.compile is True
        and cfg.training.steps == make_config().training.steps
    )
    (tmp_path / "c.toml").write_text('steps = 7\nmax_lr = 1e-3\nmodel = "tiny"\n[model_args]\nnum_layers = 2\n')
    expected = {"steps": 7, "max_lr": 1e-3, "model": "tiny", "model_args": {"num_layers": 2}}
    assert read_toml(tmp_path / "c.toml") == expected
    cfg = parse_args(["--config", str(tmp_path / "c.toml"), "--steps", "9", "--d-model", "32"])
    assert (
        cfg.training.steps == 9 and cfg.schedule.max_lr == 1e-3 and cfg.model.args == {"num_layers": 2, "d_model": 32}
    )

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"steps": 50, "batch_size": 3, "model_args": {"d_model": 16}}')
    cfg = parse_args(["--resume", str(run_dir), "--steps", "80"])
    assert (cfg.training.steps, cfg.training.batch_size, cfg.model.args, cfg.checkpoint.out_dir) == (
        80,
        3,
        {"d_model": 16},
        str(run_dir),
    )


def test_steps_on_the_command_line_win_over_a_token_budget_and_one_source_gives_one(tmp_path):
    (tmp_path / "budget.toml").write_text("tokens = 6400\n")
    assert parse_args(["--config", str(tmp_path / "budget.toml")]).training.tokens == 6400
    cfg = parse_args(["--config", str(tmp_path / "budget.toml"), "--steps", "9"])
    assert (cfg.training.steps, cfg.training.tokens) == (
        9,
        None,
    )  # the flag wins: the file's budget no longer sets the length
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"steps": 50, "tokens": 6400}')
    assert parse_args(["--resume", str(run_dir), "--steps", "80"]).training.tokens is None
    assert parse_args(["--resume", str(run_dir)]).training.tokens == 6400
    (tmp_path / "both.toml").write_text("steps = 7\ntokens = 6400\n")
    with pytest.raises(ValueError, match="both.toml: steps and tokens both set the run's length"):
        parse_args(["--config", str(tmp_path / "both.toml")])
    with pytest.raises(ValueError, match="--steps and --tokens both set the run's length"):
        parse_args(["--steps", "9", "--tokens", "6400"])


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        make_config(batch_size=0)
    with pytest.raises(ValueError, match="unknown model args"):
        make_config(model_args={"d_modle": 3})
    with pytest.raises(ValueError, match="min_lr <= max_lr"):
        make_config(min_lr=1.0, max_lr=0.1)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        parse_args(["--resume", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        parse_args(["--norm", "sideways"])


def test_a_checkpoint_saved_before_the_init_and_value_embedding_fields_resumes_as_it_trained():
    from smollm_stack.train.store.resume import resumed_model_config

    config = ModelConfig.preset("tiny")  # zero_init_residual and value_embeddings on
    new = {"zero_init_residual", "value_embeddings"}
    saved = {k: v for k, v in dataclasses.asdict(config).items() if k not in new}
    resumed = resumed_model_config(saved, config)  # the fields' defaults: the model before they existed
    assert (resumed.zero_init_residual, resumed.value_embeddings) == (False, False)
    assert resumed == dataclasses.replace(config, zero_init_residual=False, value_embeddings=False)
    assert resumed_model_config(dataclasses.asdict(config), config) == config
    plain_init = dataclasses.replace(config, zero_init_residual=False)  # an init: the checkpoint's weights replace it
    assert resumed_model_config(dataclasses.asdict(config), plain_init) == plain_init
    with pytest.raises(ValueError, match="cannot resume: the model differs from the checkpoint's in d_model"):
        resumed_model_config({**saved, "d_model": 64}, config)
    with pytest.raises(ValueError, match="in value_embeddings"):  # saved with the tables, resumed without
        resumed_model_config(dataclasses.asdict(config), dataclasses.replace(config, value_embeddings=False))
