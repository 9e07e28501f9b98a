"""Muon under FSDP2: 2 gloo processes follow 1, and a sharded checkpoint carries Muon's momenta to a 1-process resume.

The tiny model has an odd --d-ff (45), so w1 and w3 (45 x 32) split 23 + 22 rows over the two ranks: the uneven
shard a rank must cut its rows of the orthogonalized matrix by. The runs are the FSDP module's 6 steps (checkpoints
at 3 and 6), with Muon.
"""

import shutil

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_fsdp import _data, _free_port, _losses, _train, _wait

from smollm_stack.train.store.sharded import consolidate
from smollm_stack.train.log import read_metrics

MUON = "--optimizer muon --d-ff 45 --num-kv-heads 1 --sample-tokens 0 --eval-batches 4".split()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-muon")
    data = [*_data(root), *MUON]
    one = _train(*data, "--batch-size", "8", "--out-dir", str(root / "one"), cache=root / "cache-one")
    two = _train(*data, "--batch-size", "4", "--parallel", "fsdp", "--out-dir", str(root / "two"),
                 cache=root / "cache", nodes=2, port=_free_port())  # fmt: skip
    _wait(one + two)
    return root


def _assert_follows(run_dir, ref_dir):
    """fp32 runs that differ in reduction order only: the gradient is (g_0 + g_1) / 2 reduce-scattered over two
    ranks instead of one mean over the 8 sequences, ~1e-7 relative apart. Newton-Schulz amplifies an error in U at
    most 3.44^5 ~ 500x (the quintic's largest slope, 5 iterations), to 5e-5 of an update whose RMS is lr 0.2 <= 1e-3
    per step, against weights of RMS >= 0.12 (std sqrt(2 / (32 + 45))): <= 4e-7 relative a step, 2.5e-6 after six,
    and the losses move no more than the weights. 1e-5 leaves a factor 4 over that worst case (measured: 2e-7). A
    rank that orthogonalized only its own rows steps along another matrix: 1e-4 or more away."""
    got, want = _losses(run_dir), _losses(ref_dir)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_two_fsdp_processes_with_muon_follow_one_and_save_its_sharded_momenta(runs):
    assert [r["step"] for r in read_metrics(runs / "two")] == [r["step"] for r in read_metrics(runs / "one")]
    _assert_follows(runs / "two", runs / "one")
    saved = dcp.FileSystemReader(runs / "two" / "ckpt_000006.dcp").read_metadata().state_dict_metadata
    momenta = {k: v for k, v in saved.items() if k.startswith("optimizer.state.") and k.endswith(".momentum")}
    assert len(momenta) == 2 * 7  # q, k, v, output, w1, w2, w3 in each of the 2 blocks
    w1 = momenta["optimizer.state.layers.1.ffn.w1.weight.momentum"]  # whole shape, written as each rank's rows
    assert tuple(w1.size) == (45, 32)
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in w1.chunks] == [((0, 0), (23, 32)), ((23, 0), (22, 32))]
    assert "optimizer.state.token_embeddings.weight.exp_avg" in saved  # AdamW's state beside them, in one dict


def test_consolidated_momenta_are_the_one_process_momenta(runs, tmp_path):
    """The 2-rank momenta, gathered into one file by train.store.consolidate, are the 1-process run's (measured 3e-9
    apart at most, with the weights 1e-7 relative apart, as ``_assert_follows`` argues)."""
    whole = torch.load(consolidate(runs / "two" / "ckpt_000006.dcp", tmp_path / "whole.pt"), weights_only=True)
    ref = torch.load(runs / "one" / "ckpt_000006.pt", weights_only=True)
    got, want = (c["optimizer"]["optimizers"][0] for c in (whole, ref))  # Muon's, in the single-file layout
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for key, state in want["state"].items():  # averages of gradients of RMS ~1e-3: atol 1e-5 of that, as rtol
        torch.testing.assert_close(got["state"][key]["momentum"], state["momentum"], rtol=1e-5, atol=1e-8)


def test_resume_on_one_process_from_the_two_process_muon_checkpoint(runs):
    """Saved at step 3 by 2 ranks, resumed by 1 with the same global batch: steps 4 to 6 use the saved momenta
    (momenta started at zero would step along the bare gradient: another direction, another loss)."""
    run = runs / "resumed"
    shutil.copytree(runs / "two", run)
    shutil.rmtree(run / "ckpt_000006.dcp")
    (run / "summary.json").unlink()
    # MUON again: the test FLAGS' --eval-batches 0 would otherwise replace the run's saved 4
    _wait(_train("--resume", str(run), *MUON, "--batch-size", "8", cache=runs / "cache-one"))
    assert [r["step"] for r in read_metrics(run)] == [r["step"] for r in read_metrics(runs / "one")]
    _assert_follows(run, runs / "one")
