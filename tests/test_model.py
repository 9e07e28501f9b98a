"""The model against independent computations written here: each block, the whole forward, the ablations,
GQA, the state-dict layout, init, accounting, checkpoint loading and config validation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from smollm_stack import model as M
from smollm_stack.kernels import reference
from smollm_stack.model import ModelConfig, TransformerLM

FP32 = dict(atol=1e-5, rtol=1e-5)


def small_config(**overrides) -> ModelConfig:
    kwargs = dict(vocab_size=97, context_length=32, d_model=32, num_layers=2, num_heads=4, backend="eager")
    return ModelConfig(**{**kwargs, **overrides})


def make_model(seed=0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(small_config(**overrides))


# ---- Independent float64 references, written without the project's code ----


def ref_rms_norm(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def ref_rope(x, positions, theta):
    """Adjacent pairs as complex numbers, turned by e^(i pos theta^(-2k/d))."""
    d = x.shape[-1]
    angles = positions.double()[..., None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, d/2) over heads
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def ref_attention(x, sd, prefix, cfg, positions, value_embedding=0.0):
    B, T, _ = x.shape
    H, Hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = (x @ sd[prefix + "q_proj.weight"].T).view(B, T, H, dh).transpose(1, 2)
    k = (x @ sd[prefix + "k_proj.weight"].T).view(B, T, Hkv, dh).transpose(1, 2)
    v = (x @ sd[prefix + "v_proj.weight"].T + value_embedding).view(B, T, Hkv, dh).transpose(1, 2)
    if cfg.position == "rope":
        q, k = ref_rope(q, positions, cfg.rope_theta), ref_rope(k, positions, cfg.rope_theta)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, H * dh) @ sd[prefix + "output_proj.weight"].T


def ref_ffn(x, sd, prefix, cfg):
    h = F.silu(x @ sd[prefix + "w1.weight"].T)
    if cfg.ffn == "swiglu":
        h = h * (x @ sd[prefix + "w3.weight"].T)
    return h @ sd[prefix + "w2.weight"].T


def ref_forward(model, ids, positions=None):
    """The whole LM in float64 from the state dict alone."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    positions = torch.arange(ids.shape[-1]) if positions is None else positions
    norm = lambda x, name: x if cfg.norm == "none" else ref_rms_norm(x, sd[name], cfg.norm_eps)
    x = sd["token_embeddings.weight"][ids]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        ve = sd[f"value_embeddings.{i}.weight"][ids] if cfg.value_embeddings else 0.0
        if cfg.norm == "post":
            x = norm(x + ref_attention(x, sd, p + "attn.", cfg, positions, ve), p + "ln1.weight")
            x = norm(x + ref_ffn(x, sd, p + "ffn.", cfg), p + "ln2.weight")
        else:
            x = x + ref_attention(norm(x, p + "ln1.weight"), sd, p + "attn.", cfg, positions, ve)
            x = x + ref_ffn(norm(x, p + "ln2.weight"), sd, p + "ffn.", cfg)
    return norm(x, "ln_final.weight") @ sd["lm_head.weight"].T


# ---- Building blocks ----


def test_linear_and_embedding():
    torch.manual_seed(0)
    lin, emb = M.Linear(5, 7), M.Embedding(11, 3)
    assert lin.weight.shape == (7, 5) and emb.weight.shape == (11, 3)
    x, ids = torch.randn(2, 3, 5), torch.tensor([[0, 10, 4]])
    torch.testing.assert_close(lin(x), torch.einsum("bti,oi->bto", x, lin.weight), **FP32)
    torch.testing.assert_close(emb(ids), torch.stack([emb.weight[0], emb.weight[10], emb.weight[4]])[None])


def test_rms_norm_matches_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = M.RMSNorm(24, eps=1e-3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24) * 10
    torch.testing.assert_close(norm(x), ref_rms_norm(x.double(), norm.weight.double(), 1e-3).float(), **FP32)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("positions_shape", ["T", "BT"])
def test_rotary_embedding_matches_complex_rotation(positions_shape):
    torch.manual_seed(0)
    rope = M.RotaryEmbedding(theta=500.0, d_head=16, max_seq_len=64)
    x = torch.randn(2, 3, 7, 16)
    positions = torch.arange(5, 12) if positions_shape == "T" else torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(rope(x, positions), ref_rope(x, positions, 500.0).float(), **FP32)
    # Rotations keep norms and make q.k depend on the position difference only.
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 2, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 2, 16)
    dots = [(rope(q, torch.tensor([p, p])) * rope(k, torch.tensor([p + 3, p + 3]))).sum() for p in (0, 20)]
    torch.testing.assert_close(dots[0], dots[1], atol=1e-4, rtol=1e-4)


def test_rotary_embedding_rejects_positions_past_max_seq_len():
    rope = M.RotaryEmbedding(10000.0, 8, max_seq_len=4)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4\)"):
        rope(torch.randn(1, 2, 8), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="longer than max_seq_len 4"):
        rope(torch.randn(5, 8))
    with pytest.raises(ValueError, match="even"):
        M.RotaryEmbedding(10000.0, 7, 4)


@pytest.mark.parametrize("ffn", ["swiglu", "silu"])
def test_ffn_matches_formula(ffn):
    torch.manual_seed(0)
    cfg = small_config(ffn=ffn)
    block = M.SwiGLU(cfg) if ffn == "swiglu" else M.SiLUMLP(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    sd = {k: v.double() for k, v in block.state_dict().items()}
    torch.testing.assert_close(block(x), ref_ffn(x.double(), sd, "", cfg).float(), **FP32)


@pytest.mark.parametrize("num_kv_heads,position", [(4, "rope"), (2, "rope"), (1, "nope")])
def test_attention_matches_reference(num_kv_heads, position):
    torch.manual_seed(0)
    cfg = small_config(num_kv_heads=num_kv_heads, position=position)
    attn = M.CausalSelfAttention(cfg)
    x, positions = torch.randn(2, 9, cfg.d_model), torch.arange(3, 12)
    sd = {k: v.double() for k, v in attn.state_dict().items()}
    for pos in (None, positions):
        expected = ref_attention(x.double(), sd, "", cfg, torch.arange(9) if pos is None else pos)
        torch.testing.assert_close(attn(x, positions=pos), expected.float(), **FP32)


def test_reference_functions_are_stable_and_match_torch():
    # the oracles in kernels/reference.py that the CS336 adapters (train/cs336.py) hand out
    torch.manual_seed(0)
    x = torch.randn(4, 50) * 1000  # exp() of these overflows without the max subtraction
    torch.testing.assert_close(reference.softmax(x, dim=-1), torch.softmax(x, dim=-1))
    assert torch.isfinite(reference.softmax(x, dim=0)).all()
    torch.testing.assert_close(reference.silu(x[0] / 1000), F.silu(x[0] / 1000))
    logits, targets = torch.randn(2, 3, 50) * 1000, torch.randint(0, 50, (2, 3))
    expected = F.cross_entropy(logits.view(-1, 50), targets.view(-1))
    torch.testing.assert_close(reference.cross_entropy(logits, targets), expected)
    q, k, v = torch.randn(2, 3, 4, 5, 8), torch.randn(2, 3, 4, 6, 8), torch.randn(2, 3, 4, 6, 8)
    mask = torch.rand(5, 6) > 0.3
    mask[:, 0] = True  # every query sees something
    torch.testing.assert_close(
        reference.scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask)
    )


# ---- The whole model ----

VARIANTS = {
    "pre": {},
    "post": dict(norm="post"),
    "none": dict(norm="none"),
    "nope": dict(position="nope"),
    "silu": dict(ffn="silu"),
    "gqa": dict(num_kv_heads=2),
    "tied": dict(tie_embeddings=True),
    "value-embeddings": dict(value_embeddings=True, num_kv_heads=2),  # a kv width of half d_model
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_independent_reference(variant):
    model = make_model(**VARIANTS[variant])
    with torch.no_grad():  # distinct gains, so a norm applied in the wrong place shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(model(ids), ref_forward(model, ids).float(), atol=1e-4, rtol=1e-4)
    positions = torch.randint(0, 32, (2, 11))
    expected = ref_forward(model, ids, positions).float()
    torch.testing.assert_close(model(ids, positions=positions), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_train(variant):
    """Forward, backward and a few optimizer steps on one batch lower the loss of every ablation."""
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (4, 16))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_loss_is_mean_cross_entropy_of_the_logits_ignoring_minus_100():
    model = make_model()
    ids, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    targets[0, :4] = -100
    loss = model(ids, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = F.cross_entropy(model(ids).view(-1, 97), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, **FP32)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(num_kv_heads=2)
    mha = TransformerLM(dataclasses.replace(gqa.config, num_kv_heads=4))
    sd = gqa.state_dict()
    for name in list(sd):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv * dh, d) -> (H * dh, d), each head twice
            sd[name] = sd[name].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(gqa(ids), mha(ids), **FP32)


def test_default_positions_are_arange_and_too_long_inputs_fail():
    model = make_model()
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(model(ids), model(ids, positions=torch.arange(10)))
    assert not torch.allclose(model(ids), model(ids, positions=torch.arange(1, 11)))
    with pytest.raises(ValueError, match="longer than the context length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 32\)"):
        model(ids, positions=torch.arange(30, 40))


def test_state_dict_names_and_shapes():
    model = make_model(num_kv_heads=2, d_ff=48)
    expected = {"token_embeddings.weight": (97, 32), "ln_final.weight": (32,), "lm_head.weight": (97, 32)}
    for i in range(2):
        expected |= {
            f"layers.{i}.attn.q_proj.weight": (32, 32),
            f"layers.{i}.attn.k_proj.weight": (16, 32),
            f"layers.{i}.attn.v_proj.weight": (16, 32),
            f"layers.{i}.attn.output_proj.weight": (32, 32),
            f"layers.{i}.ln1.weight": (32,),
            f"layers.{i}.ln2.weight": (32,),
            f"layers.{i}.ffn.w1.weight": (48, 32),
            f"layers.{i}.ffn.w2.weight": (32, 48),
            f"layers.{i}.ffn.w3.weight": (48, 32),
        }
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert not any(name.startswith("ln") or ".ln" in name for name in make_model(norm="none").state_dict())


def test_init_weights():
    model = TransformerLM(small_config(d_model=64, d_ff=192, vocab_size=1000))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    torch.manual_seed(0)
    model.init_weights()
    w = model.layers[0].ffn.w1.weight  # (192, 64)
    std = math.sqrt(2 / (192 + 64))
    assert abs(w.std().item() / std - 0.987) < 0.03  # a normal cut at 3 sigma keeps 0.987 of its std
    assert w.abs().max() <= 3 * std
    e = model.token_embeddings.weight
    assert 0.9 < e.std().item() < 1.05 and e.abs().max() <= 3
    assert all((n.weight == 1).all() for n in model.modules() if isinstance(n, M.RMSNorm))
    tied = TransformerLM(small_config(d_model=64, vocab_size=1000, tie_embeddings=True))
    assert tied.lm_head.weight is tied.token_embeddings.weight
    assert tied.lm_head.weight.std() < 0.1  # lm_head's init, not the embedding's std 1


@pytest.mark.parametrize("ffn", M.config.FFNS)
def test_zero_init_residual(ffn):
    model = make_model(zero_init_residual=True, ffn=ffn)
    zero = {name for name, p in model.named_parameters() if not p.any()}
    assert zero == {f"layers.{i}.{m}.weight" for i in range(2) for m in ("attn.output_proj", "ffn.w2")}
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():  # every block starts as the identity: the logits are the embeddings' alone
        alone = model.lm_head(model.ln_final(model.token_embeddings(ids)))
    torch.testing.assert_close(model(ids), alone, atol=0, rtol=0)
    assert all(ModelConfig.preset(name).zero_init_residual for name in M.config.PRESETS)
    assert not small_config().zero_init_residual  # a bare config keeps the Xavier init


# ---- Accounting, presets, checkpoints, validation ----


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts_match_the_module(variant):
    model = make_model(**VARIANTS[variant])
    total, non_embedding = M.param_counts(model.config)
    assert total == sum(p.numel() for p in model.parameters())
    vocab = sum(p.numel() for p in {model.token_embeddings.weight, model.lm_head.weight})
    vocab += sum(p.numel() for p in model.value_embeddings.parameters())
    assert non_embedding == total - vocab


def test_flops_per_token_by_hand():
    # d 32, 4 heads, 2 kv heads (dh 8), d_ff 48, 2 layers, V 97, T 32.
    cfg = small_config(num_kv_heads=2, d_ff=48)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 48
    expected = 6 * (2 * per_layer + 97 * 32) + 6 * 2 * 32 * 32
    assert M.flops_per_token(cfg) == expected


def test_presets():
    ts = ModelConfig.preset("tinystories-17m")
    assert (ts.vocab_size, ts.context_length, ts.d_model, ts.d_ff, ts.num_layers, ts.num_heads) == (
        10000,
        256,
        512,
        1344,
        4,
        16,
    )
    assert ts.rope_theta == 10000.0 and ts.num_kv_heads == 16
    tiny = ModelConfig.preset("tiny", vocab_size=300)
    assert (tiny.vocab_size, tiny.context_length, tiny.d_model, tiny.num_layers, tiny.num_heads) == (
        300,
        128,
        128,
        4,
        4,
    )
    assert 110e6 < M.param_counts(ModelConfig.preset("125m"))[0] < 140e6
    # Derived defaults follow overrides rather than the preset's resolved values.
    assert ModelConfig.preset("tiny", ffn="silu").d_ff == 512 and ModelConfig.preset("tiny", d_model=512).d_ff == 1344
    assert ModelConfig(**dataclasses.asdict(ts)) == ts  # JSON round trip through a checkpoint
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(d_model=30), r"d_model \(30\) must be divisible by num_heads \(4\)"),
        (dict(num_kv_heads=3), r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
        (dict(d_model=36, num_heads=4), "head dim must be even, got 9"),
        (dict(norm="layer"), "norm must be one of"),
        (dict(position="alibi"), "position must be one of"),
        (dict(ffn="gelu"), "ffn must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(num_layers=0), "num_layers must be a positive int"),
    ],
)
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_odd_head_dim_is_fine_without_rope():
    assert small_config(d_model=36, num_heads=4, position="nope").head_dim == 9


def test_load_model_strips_wrapper_prefixes(tmp_path):
    model = make_model(num_kv_heads=2)
    sd = {"_orig_mod.module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "model_config": dataclasses.asdict(model.config), "iteration": 3}, path)
    loaded = M.load_model(path)
    ids = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(loaded(ids), model(ids))
    assert M.clean_state_dict({"module._orig_mod.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        M.load_model(tmp_path / "missing.pt")


def old_config_dict(config: ModelConfig) -> dict:
    """The model_config dict that the code before the rename of `kernels` to `backend` saved for config."""
    saved = dataclasses.asdict(config)
    return {("kernels" if k == "backend" else k): v for k, v in saved.items()}


def test_a_saved_config_with_the_old_kernels_field_loads_as_backend():
    config = small_config(backend="eager")  # not the default "auto", so a dropped value would show
    old = old_config_dict(config)
    assert "backend" not in old and ModelConfig.from_dict(old) == config
    assert ModelConfig.from_dict({**old, "backend": "eager"}) == config  # both names, one value: fine
    with pytest.raises(ValueError, match="both kernels='eager' and backend='triton'"):
        ModelConfig.from_dict({**old, "backend": "triton"})


def test_a_checkpoint_saved_before_the_backend_rename_loads(tmp_path):
    model = make_model(backend="eager")
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": old_config_dict(model.config), "iteration": 3}, path)
    loaded = M.load_model(path)
    assert loaded.config == model.config
    ids = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(loaded(ids), model(ids))
    torch.save({"model": model.state_dict(), "model_config": {**old_config_dict(model.config), "backend": "auto"}},
               path)  # fmt: skip
    with pytest.raises(ValueError, match="ckpt.pt has a model_config .* both kernels='eager' and backend='auto'"):
        M.load_model(path)


def test_triton_kv_cache_decoding_matches_eager():
    """Decoding through the Triton ops (the interpreter on a CPU): fewer queries than keys, the mask aligned to the end.

    tests/test_kernels_model.py holds the Triton model's loss and gradients equal to the eager one's.
    """
    pytest.importorskip("triton")
    eager = make_model(num_heads=2, num_kv_heads=1, num_layers=1)  # head dim 16: the attention kernel needs >= 16
    triton_model = TransformerLM(dataclasses.replace(eager.config, backend="triton"))
    triton_model.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 8))
    caches = triton_model.make_kv_caches(2, 8)
    with torch.inference_mode():
        steps = [triton_model(ids[:, :5], kv_caches=caches)] + [
            triton_model(ids[:, t : t + 1], kv_caches=caches) for t in (5, 6)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), eager(ids[:, :7]), atol=1e-4, rtol=1e-4)


def test_value_embeddings_keep_the_values_in_the_autocast_dtype(monkeypatch):
    """Under autocast the projections are bf16 and the value-embedding tables fp32: the sum must stay bf16, or the
    attention kernels (ours and SDPA's on CUDA) get mixed dtypes and refuse the default preset's model."""
    from smollm_stack.kernels import eager

    seen = []
    attention = eager.flash_attention

    def checking(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(eager, "flash_attention", checking)
    config = ModelConfig.preset("tiny", vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=2,
                                value_embeddings=True, backend="eager")  # fmt: skip
    ids = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        TransformerLM(config)(ids, ids)
    assert seen == [(torch.bfloat16,) * 3]
