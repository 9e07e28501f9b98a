"""The attention kernels compile for an H100 (sm_90a) through Triton's real launch path, without a GPU.

The interpreter accepts things the compiler rejects, so CI also lowers each kernel as a GPU launch would, with its
argument specialization (kernels.tooling.lowering), on what tests/test_lowering_gates.py does not cover: fp32 (the FMA
path with input_precision="ieee") non-causal at head dim 32, and fp16 causal grouped-query at head dim 16, without and
with documents (doc_ids), all at odd lengths, where no length or row offset is divisible by 16. One config per kernel
(the first its pruner keeps) keeps this quick; the gates compile every kept bf16 config.
"""

SCRIPT = """
import torch
from smollm_stack.kernels import attention as A

for tuned in (A._attn_fwd, A._attn_bwd_dkdv, A._attn_bwd_dq):
    tuned.early_config_prune = lambda configs, named_args, prune=tuned.early_config_prune, **kw: prune(
        configs, named_args, **kw)[:1]


def fwd_bwd(dtype, heads, kv_heads, T, S, d, causal, docs=False):
    q = torch.empty(1, heads, T, d, dtype=dtype, requires_grad=True)
    k, v = (torch.empty(1, kv_heads, S, d, dtype=dtype, requires_grad=True) for _ in range(2))
    doc_ids = (torch.arange(S) // 13)[None] if docs else None

    def run():
        out = A.flash_attention(q, k, v, causal=causal, doc_ids=doc_ids)
        out.backward(torch.empty_like(out))
    return run


CASES = {"fp32 d32 noncausal": fwd_bwd(torch.float32, 2, 1, 45, 19, 32, False),
         "fp16 d16 gqa causal": fwd_bwd(torch.float16, 4, 2, 67, 67, 16, True),
         "fp16 d16 gqa docs": fwd_bwd(torch.float16, 4, 2, 67, 67, 16, True, docs=True)}
"""


def test_attention_kernels_compile_for_sm90(compile_for_gpu):
    launches = compile_for_gpu(SCRIPT)
    for label, records in launches.items():
        names = sorted(r["name"] for r in records)
        assert names == ["_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd"], (label, names)
        for r in records:
            assert r["error"] is None and r["regs"] > 0, (label, r)
            if r["name"] != "_attn_bwd_delta":
                assert r["config"]["HEAD_DIM"] == int(label.split()[1][1:])
                # specialized as a GPU launch is: the contiguous head dim's stride == 1 became a constant
                assert r["config"]["stride_qd"] == 1
                assert r["config"]["DOT_PRECISION"] == ("ieee" if label.startswith("fp32") else "tf32")
