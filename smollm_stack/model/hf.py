"""Hugging Face interop: write a TransformerLM as a `LlamaForCausalLM` directory and read one back.

Only files are written and read (config.json, generation_config.json, model.safetensors), so `transformers` is not
needed here; the tokenizer's files are written by the caller (train/lm.py), since the model knows no tokenizer.
A model with value embeddings (the default preset's) is Llama plus one table a block, which LlamaForCausalLM lacks:
it exports as `SmolLMStackForCausalLM`, whose code (hf_modeling.py, copied into the directory and named in
config.json's auto_map) transformers loads with `trust_remote_code=True`; its other tensors keep Llama's names.
Each file is written whole or not at all and never through a symbolic link (smollm_stack.files).
Two conventions differ from ours:
- names: `layers.0.attn.q_proj` is `model.layers.0.self_attn.q_proj`, and so on (see `_hf_names`);
- RoPE: Hugging Face rotates the halves (x[i], x[i + d/2]) of each head where we rotate adjacent pairs
  (x[2i], x[2i+1]), with the same frequency for pair i. Reordering the rows of q_proj and k_proj within each head
  (2i -> i, 2i+1 -> i + d/2) turns one into the other; q.k is unchanged because q and k move together.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from smollm_stack.files import make_dir, write_atomic
from smollm_stack.model.config import ModelConfig
from smollm_stack.model.model import TransformerLM


def _hf_names(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> the LlamaForCausalLM one."""
    names = {"token_embeddings.weight": "model.embed_tokens.weight", "ln_final.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            names[f"{ours}attn.{proj}.weight"] = f"{theirs}self_attn.{proj}.weight"
        names[f"{ours}attn.output_proj.weight"] = f"{theirs}self_attn.o_proj.weight"
        for w, hf in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            names[f"{ours}ffn.{w}.weight"] = f"{theirs}mlp.{hf}.weight"
        names[f"{ours}ln1.weight"] = f"{theirs}input_layernorm.weight"
        names[f"{ours}ln2.weight"] = f"{theirs}post_attention_layernorm.weight"
        if config.value_embeddings:
            names[f"value_embeddings.{i}.weight"] = f"model.value_embeddings.{i}.weight"
    return names


def _pairs_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a (heads * head_dim, d) q/k projection from adjacent-pair to rotate-half order."""
    return w.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)


def _halves_to_pairs(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of _pairs_to_halves."""
    return w.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)


REMOTE_CODE = "modeling_smollm_stack.py"  # hf_modeling.py, as a directory with value embeddings holds it
LLAMA_BLOCK = dict(norm="pre", position="rope", ffn="swiglu")  # what transformers' Llama computes


def check_exportable(config: ModelConfig):
    """Raise, naming the fields and their fix, if the model is not a Llama (with or without value embeddings)."""
    differ = [f"{k}={getattr(config, k)!r}" for k, v in LLAMA_BLOCK.items() if getattr(config, k) != v]
    if differ:
        want = ", ".join(f"{k}={v!r}" for k, v in LLAMA_BLOCK.items())
        raise ValueError(
            f"only Llama blocks export, and this model has {', '.join(differ)}: these ablations have no transformers "
            f"counterpart; export a model trained with {want} (the presets' defaults)"
        )


def hf_config(config: ModelConfig, dtype: torch.dtype, token_ids: dict[str, int] | None = None) -> dict:
    """config.json of the export: LlamaForCausalLM's, or SmolLMStackForCausalLM's with value embeddings."""
    c = config
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # transformers >= 5
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **(token_ids or {}),
    }
    if not c.value_embeddings:
        return llama
    module = REMOTE_CODE.removesuffix(".py")
    return llama | {
        "architectures": ["SmolLMStackForCausalLM"],
        "model_type": "smollm_stack",
        "value_embeddings": True,
        "auto_map": {
            "AutoConfig": f"{module}.SmolLMStackConfig",
            "AutoModelForCausalLM": f"{module}.SmolLMStackForCausalLM",
        },
    }


def export_hf(model: TransformerLM, out_dir: str | os.PathLike, token_ids: dict[str, int] | None = None) -> Path:
    """Write model as a LlamaForCausalLM directory (config.json, generation_config.json, model.safetensors), or as
    a SmolLMStackForCausalLM one (plus modeling_smollm_stack.py) when it has value embeddings.

    token_ids: {"bos_token_id", "eos_token_id", "pad_token_id"} (any of them) for config.json and the generation
    config, so that generate() stops where our sampler does; without them transformers assumes Llama's ids.
    Returns the directory.
    """
    c = model.config
    check_exportable(c)
    state = model.state_dict()
    tensors = {}
    for ours, theirs in _hf_names(c).items():
        w = state[ours].detach()
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = _pairs_to_halves(w, c.head_dim)
        tensors[theirs] = w.to("cpu", copy=True).contiguous()
    config = hf_config(c, next(iter(tensors.values())).dtype, token_ids)
    generation = dict(token_ids or {})
    out_dir = make_dir(out_dir, exist_ok=True)
    write_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    write_atomic(out_dir / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    if c.value_embeddings:
        write_atomic(out_dir / REMOTE_CODE, Path(__file__).with_name("hf_modeling.py").read_bytes())
    # save_file would open the path itself (through a link): the bytes in memory once more, for the model's size
    write_atomic(out_dir / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    return out_dir


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return value


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a cut or foreign file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's model.safetensors, or of the shards its index lists (inside the directory)."""
    if (path / "model.safetensors").is_file():
        return _load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} needs a 'weight_map' of tensor names to shard file names")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        file = (path / shard).resolve()
        if file.parent != path.resolve():  # "../../x" or "/etc/x" would read whatever the index points at
            raise ValueError(f"{index} names the shard {shard!r}, which is not a file in {path}")
        tensors |= _load_file(file)
    return tensors


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings",
)  # fmt: skip


def import_hf(path: str | os.PathLike, backend: str = "auto") -> TransformerLM:
    """A TransformerLM (norm="pre", position="rope", ffn="swiglu") from a LlamaForCausalLM directory, or from
    one of our SmolLMStackForCausalLM exports (with value embeddings)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    hf = _read_json(path / "config.json")
    missing = [k for k in _REQUIRED if type(hf.get(k)) is not int or hf[k] <= 0]
    if missing:
        raise ValueError(f"{path / 'config.json'} needs {', '.join(missing)} as positive integers")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if hf.get("model_type") not in ("llama", "smollm_stack") or hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path} is not a Llama model with SiLU (model_type={hf.get('model_type')!r})")
    if hf.get("attention_bias") or hf.get("mlp_bias") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path} uses biases or RoPE scaling, which this model does not have")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
        raise ValueError(f"{path} has head_dim * num_attention_heads != hidden_size, which this model does not allow")
    config = ModelConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["max_position_embeddings"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        d_ff=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        value_embeddings=hf["model_type"] == "smollm_stack" and hf.get("value_embeddings") is True,
        backend=backend,
    )
    tensors = _load_safetensors(path)
    state = {}
    for ours, theirs in _hf_names(config).items():
        if theirs not in tensors:
            raise ValueError(f"{path} lacks the tensor {theirs}")
        w = tensors[theirs]
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = _halves_to_pairs(w, config.head_dim)
        state[ours] = w
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embeddings.weight"]
    model = TransformerLM(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the tensors don't fit its config.json: {str(e).splitlines()[-1].strip()}") from None
    return model
