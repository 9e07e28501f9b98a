"""FSDP2 runs, sharded checkpoints, activation checkpointing and the memory estimate, on CPUs with gloo.

One module-scoped set of runs serves the multi-process tests (each process start costs seconds on 2 cores): a
1-process reference, and a 2-process FSDP run launched as two "nodes" (two torchrun invocations meeting through a
c10d rendezvous on loopback), each with its own data cache, saving sharded checkpoints at steps 3 and 6.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm_stack.model import ModelConfig, TransformerLM, load_model, param_counts
from smollm_stack.model.hf import export_hf
from smollm_stack.train.parallel.distributed import Dist
from smollm_stack.train.store.consolidate import main as consolidate_main
from smollm_stack.train.data.tokens import default_corpus
from smollm_stack.train.store.resume import check_kind
from smollm_stack.train.store.sharded import MANIFEST_FILE, damage
from smollm_stack.train.log import read_metrics
from smollm_stack.train.store.rundir import RunDir
from smollm_stack.train.parallel.memory import (
    GiB,
    block_activation_elements,
    bytes_per_gpu,
    checkpoint_blocks,
    memory_table,
)

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [  # 6 steps of the tiny model on byte-level text; checkpoints at 3 and 6; evals on every window
    *"--context-length 16 --warmup-steps 2 --eval-interval 3 --eval-batches 0 --log-interval 1 --steps 6".split(),
    *"--ckpt-interval 3 --no-progress --device cpu --d-model 32 --num-layers 2 --num-heads 2".split(),
    *"--sample-prompt Once --sample-tokens 4 --schedule cosine".split(),  # cosine: no pre-decay checkpoint at 5
    *"--optimizer torch".split(),  # AdamW's state here; tests/test_fsdp_muon.py runs Muon's
    # A plain Llama, which export_hf takes, with every matrix random at the start, as the fp32-ulp tolerances below
    # were set for: from zero output matrices one weight in 2048 drifted 33 ulps between the 2-process and 1-process
    # runs in 6 steps. tests/test_fsdp_muon.py shards the tiny preset as it is.
    *"--no-zero-init-residual --no-value-embeddings".split(),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train(*args, cache: Path, nodes: int = 0, port: int = 0) -> list[subprocess.Popen]:
    """Start the trainer: one process, or ``nodes`` torchrun "nodes" of one process each, each with its cache."""
    if not nodes:
        cmds = [[sys.executable, "-m", "smollm_stack.train", *FLAGS, *args]]
    else:
        rdzv = f"--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id fsdp-test --nproc-per-node 1"
        cmds = [
            [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node-rank={n}", *rdzv.split()]
            + ["-m", "smollm_stack.train", *FLAGS, *args]
            for n in range(nodes)
        ]
    return [
        subprocess.Popen(cmd, env={**ENV, "SMOLLM_CACHE": str(cache) + (f"-node{n}" if nodes else "")}, cwd=ROOT)
        for n, cmd in enumerate(cmds)
    ]


def _wait(procs: list[subprocess.Popen], timeout: float = 300):
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:  # a hung rank (in a collective the other never joins) is stopped: torchrun passes SIGTERM on
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    assert codes == [0] * len(procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _byte_tokenizer(out: Path) -> Path:
    """A tokenizer with no merges (257 ids): text data without the cost of training BPE in every test process."""
    from smollm_stack.tokenizer import Tokenizer

    Tokenizer({0: b"<|endoftext|>", **{i + 1: bytes([i]) for i in range(256)}}, [], ["<|endoftext|>"]).save(out)
    return out


def _data(root: Path) -> list[str]:
    """Text files and the byte tokenizer in ``root``, as trainer flags."""
    train_txt, valid_txt = default_corpus()
    (root / "train.txt").write_text(train_txt.read_text()[:20_000])
    # 5921 ASCII bytes, one token each: 370 validation windows of 16 (+1), 46 rounds of 8 and 2 left over, which
    # only rank 0 has: rank 1 must still join that last forward under FSDP.
    valid = valid_txt.read_text().replace("<|endoftext|>", "\n").encode("ascii", "ignore")
    (root / "valid.txt").write_bytes(valid[:5921])
    data = ["--train-data", str(root / "train.txt"), "--val-data", str(root / "valid.txt")]
    return data + ["--tokenizer", str(_byte_tokenizer(root / "tok"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = _data(root)
    one = _train(*data, "--batch-size", "8", "--out-dir", str(root / "one"), cache=root / "cache-one")
    two = _train(*data, "--batch-size", "4", "--parallel", "fsdp", "--out-dir", str(root / "two"),
                 cache=root / "cache", nodes=2, port=_free_port())  # fmt: skip
    _wait(one + two)
    return root, data


def _losses(run_dir: Path) -> dict[str, list]:
    rows = read_metrics(run_dir)
    return {k: [r[k] for r in rows if r.get(k) is not None] for k in ("train_loss", "val_loss", "grad_norm")}


def _assert_follows(run_dir: Path, ref_dir: Path):
    """fp32 runs that differ only in reduction order: the gradient is (g_0 + g_1) / 2 reduce-scattered over two
    ranks instead of one mean over the 8 sequences, a few ulps (~1e-7 relative) apart, and six Adam steps carry
    that difference into the weights at about the same relative size; 1e-5 leaves a factor ~100 for the growth."""
    got, want = _losses(run_dir), _losses(ref_dir)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_two_fsdp_nodes_follow_one_process_and_each_prepares_its_cache(runs):
    root, _ = runs
    assert [r["step"] for r in read_metrics(root / "two")] == [r["step"] for r in read_metrics(root / "one")]
    _assert_follows(root / "two", root / "one")
    for node in (0, 1):  # each "node" encoded the text into its own cache, neither read the other's
        assert len(list((root / f"cache-node{node}").glob("*.npy"))) == 2
    ckpts = sorted(p.name for p in (root / "two").glob("ckpt_*"))
    assert ckpts == ["ckpt_000003.dcp", "ckpt_000006.dcp"]
    step = root / "two" / "ckpt_000006.dcp"
    files = json.loads((step / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert (root / "two" / "sample.txt").read_text().startswith("Once")  # sampled from the gathered whole model


def test_resuming_under_the_other_parallelism_is_refused(runs):
    root, _ = runs
    with pytest.raises(ValueError, match="holds sharded checkpoints: resume with --parallel fsdp"):
        check_kind(RunDir(root / "two"), "ddp")
    with pytest.raises(ValueError, match="holds single-file checkpoints: resume with --parallel ddp"):
        check_kind(RunDir(root / "one"), "fsdp")


def _resumable_copy(root: Path, name: str) -> Path:
    """The 2-process run as it was when killed just after step 6's checkpoint began, before its summary."""
    run = root / name
    shutil.copytree(root / "two", run)
    (run / "summary.json").unlink()
    return run


@pytest.mark.parametrize("processes, damaged", [(1, "__1_0.distcp"), (2, "__0_0.distcp")])
def test_resume_on_one_or_two_processes_skipping_a_damaged_checkpoint(runs, processes, damaged):
    """Saved by 2 ranks, resumed by 1 (whole tensors) or 2 (resharded). The newest checkpoint has a flipped byte in
    one shard (on 2 ranks, one that rank 1 verifies): it is set aside and the run resumes from step 3."""
    root, _ = runs
    run = _resumable_copy(root, f"resume{processes}")
    shard = run / "ckpt_000006.dcp" / damaged
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 1
    shard.write_bytes(bytes(raw))
    if processes == 1:  # the same global batch of 8 sequences, now from one process
        procs = _train("--resume", str(run), "--batch-size", "8", cache=root / "cache-one")
    else:  # with activation checkpointing too: recomputed blocks under FSDP2's hooks give the same numbers
        procs = _train("--resume", str(run), "--activation-checkpointing", cache=root / "cache", nodes=2,
                       port=_free_port())  # fmt: skip
    _wait(procs)
    assert (run / "ckpt_000006.dcp.corrupt").is_dir() and (run / "ckpt_000006.dcp").is_dir()  # rewritten
    _assert_follows(run, root / "one")


def test_damage_names_what_is_wrong(runs, tmp_path):
    step = tmp_path / "ckpt_000006.dcp"
    shutil.copytree(runs[0] / "two" / "ckpt_000006.dcp", step)
    assert damage(step, Dist()) is None
    (step / "meta.pt").unlink()
    assert "incomplete: meta.pt is missing" in damage(step, Dist())
    (step / MANIFEST_FILE).write_text("{")
    assert f"no readable {MANIFEST_FILE}" in damage(step, Dist())


def test_consolidate_writes_a_checkpoint_that_load_model_reads(runs, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "whole.pt"
    assert consolidate_main([str(root / "two" / "ckpt_000006.dcp"), "--out", str(out)]) == 0
    ref = torch.load(root / "one" / "ckpt_000006.pt", weights_only=True)
    whole = torch.load(out, weights_only=True)
    assert whole.keys() == ref.keys() and whole["iteration"] == 6
    for key, value in ref["model"].items():  # the 2-process weights, a few fp32 ulps from the 1-process ones
        torch.testing.assert_close(whole["model"][key], value, rtol=1e-5, atol=1e-6)
    assert whole["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    assert whole["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    assert load_model(out).config.d_model == 32
    export_hf(load_model(out), tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert consolidate_main([str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: no sharded checkpoint directory")


# ---- activation checkpointing -----------------------------------------------------------------------------------


def _saved_bytes(fn, skip=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (``skip``'s storages left out)."""
    skipped = {t.untyped_storage().data_ptr() for t in skip}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skipped and t.is_floating_point():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_activation_checkpointing_same_loss_and_gradients_fewer_saved_bytes(backend):
    config = ModelConfig.preset("tiny", vocab_size=96, context_length=24, d_model=48, num_layers=2, num_heads=3,
                                num_kv_heads=1, backend=backend, zero_init_residual=False,
                                value_embeddings=True)  # fmt: skip
    torch.manual_seed(0)  # (random output matrices too: zero ones would leave the blocks out of the loss)
    plain = TransformerLM(config)
    recomputed = TransformerLM(config)
    recomputed.load_state_dict(plain.state_dict())
    checkpoint_blocks(recomputed)
    ids = torch.randint(0, 96, (2, 11))
    targets = torch.randint(0, 96, (2, 11))
    losses, saved = [], []
    for model in (plain, recomputed):
        saved.append(_saved_bytes(lambda m=model: losses.append(m(ids, targets)), skip=list(model.parameters())))
        losses[-1].backward()
    # The same ops on the same numbers, recomputed: bitwise equal.
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    # Checkpointed, each block keeps only its input, (2 x 11) x 48 fp32: of the blocks' share of the saved bytes
    # (at least 7 such tensors a block, see train/parallel/memory.py) only 1 in 7 remains.
    block_input = 2 * 11 * 48 * 4
    outside = saved[1] - 2 * block_input  # the embedding's output, ln_final's input: saved either way
    assert saved[0] - outside >= 2 * 7 * block_input
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():  # evaluation and sampling run the blocks as they are
        assert torch.equal(recomputed(ids), plain(ids))


# ---- the memory estimate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [dict(d_model=64, num_heads=4, num_kv_heads=2), dict(d_model=48, num_heads=3),
                                   dict(d_model=48, num_heads=3, value_embeddings=False)])  # fmt: skip
def test_block_activation_estimate_is_what_the_kernels_save(shape):
    """The per-token count in train/parallel/memory.py against the bytes our Triton kernels (interpreted) save for one
    block, in fp32: exact, since both count the same tensors (integer positions left out)."""
    config = ModelConfig.preset("tiny", vocab_size=64, context_length=32, num_layers=1, backend="triton", **shape)
    block = TransformerLM(config).layers[0]
    x = torch.randn(2, 19, config.d_model, requires_grad=True)
    value = torch.randn(2, 19, config.num_kv_heads * config.head_dim) if config.value_embeddings else None
    saved = _saved_bytes(lambda: block(x, value_embedding=value), skip=[*block.parameters(), x])
    elements, stats = block_activation_elements(config)
    assert saved == 2 * 19 * 4 * (elements - config.d_model + stats)  # x itself is the caller's


def test_memory_per_gpu_shards_with_fsdp_and_fits_the_card():
    config = ModelConfig.preset("125m")
    n = param_counts(config)[0]
    ddp = bytes_per_gpu(config, 16, torch.bfloat16, "ddp", 8)
    fsdp = bytes_per_gpu(config, 16, torch.bfloat16, "fsdp", 8)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.unsharded) == (4 * n, 4 * n, 8 * n, 0)
    assert (fsdp.params, fsdp.optimizer) == (n // 2, n)  # 4N / 8, 8N / 8
    assert fsdp.activations == ddp.activations and fsdp.unsharded > 0
    ckpt = bytes_per_gpu(config, 16, torch.bfloat16, "fsdp", 8, activation_checkpointing=True)
    assert ckpt.activations < fsdp.activations / 4
    assert fsdp.fits(80) and not bytes_per_gpu(config, 256, torch.bfloat16, "ddp", 8).fits(80)
    table = memory_table(config, 16, 8, gpu_mem_gb=80)
    assert table.count("\n") == 5 and "| fsdp x 8 | yes |" in table and table.endswith("yes |")
    with pytest.raises(ValueError, match="parallel must be one of"):
        bytes_per_gpu(config, 16, parallel="tp")
    assert GiB == 2**30


def test_budget_says_which_setting_fits_the_card(capsys):
    from smollm_stack.train.experiments.__main__ import main as experiments_main

    flags = "budget --flops 3e20 --gpus 8 --batch-size 16".split()
    assert experiments_main([*flags, "--gpu-mem-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "| ddp x 8 | yes | 5.71 GiB" in out and "fits with: --parallel fsdp --activation-checkpointing" in out
    assert 'parallel = "fsdp"' in out and "activation_checkpointing = true" in out
    assert experiments_main([*flags, "--gpu-mem-gb", "2"]) == 0
    assert "nothing fits 2 GB" in capsys.readouterr().out
