"""Load a model from a trainer checkpoint: {"model": state_dict, "model_config": asdict(ModelConfig), ...}."""

import os
import pickle

import torch

from smollm_stack.model.config import ModelConfig
from smollm_stack.model.model import TransformerLM

# torch.compile wraps the model as `_orig_mod`, DistributedDataParallel as `module`; either may wrap the other.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state_dict: dict) -> dict:
    """The state dict with the torch.compile and DDP wrapper prefixes stripped from every key."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TransformerLM:
    """The TransformerLM of a checkpoint file, in eval mode on device (reads only "model" and "model_config").

    Loaded with weights_only=True, so no code in the file runs; its .sha256 sidecar is the trainer's to check (the
    model knows no trainer): commands verify it first (train.store.checkpoint.verify), as `smollm lm` does.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False: never, for a file we can't trust
        raise ValueError(f"{path} holds objects other than tensors and plain containers: refused") from None
    except Exception as e:  # KeyError, EOFError, RuntimeError, ...: whatever torch.load meets in a foreign file
        raise ValueError(f"{path} is not a torch.save file, or is cut short ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_config"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint: expected a dict with 'model' and 'model_config'")
    try:
        config = ModelConfig.from_dict(checkpoint["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has a model_config this ModelConfig does not take: {e}") from None
    with torch.device(device):
        model = TransformerLM(config)
    try:
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights don't fit its model_config: {str(e).splitlines()[0]}") from None
    return model.eval()
