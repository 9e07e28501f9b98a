"""The optimizer a run trains with (``--optimizer``), built in one place from the config and the model."""

import torch

from smollm_stack.train.config import TrainConfig
from smollm_stack.train.muon import Muon, Optimizers
from smollm_stack.train.optim import make_adamw


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
    """``--optimizer torch`` / ``ours``: AdamW on everything (torch's fused one, or train/optim.py's). ``muon``: Muon
    on the hidden matrices, torch's AdamW on the rest.

    Weight decay goes to matrices and embeddings, not to the norm gains. Every group starts at ``cfg.max_lr``; the
    trainer sets each group's lr from the schedule before each step (Muon's update is scaled to AdamW's RMS, so
    one lr serves both: see train/muon.py).
    """
    hidden = []
    if cfg.optimizer == "muon":
        hidden = [p for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2]
    in_muon = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in in_muon]
    adamw = make_adamw(
        "ours" if cfg.optimizer == "ours" else "torch",
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        device,
        lr=cfg.max_lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    if not hidden:
        return adamw
    muon = Muon(hidden, lr=cfg.max_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return Optimizers(muon, adamw)
