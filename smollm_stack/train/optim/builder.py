"""The optimizer a run trains with (``--optimizer``), built in one place from the config and the model, and the
container that steps Muon and AdamW as one."""

import torch

from smollm_stack.train.config import OptimizerSection
from smollm_stack.train.optim.muon import Muon
from smollm_stack.train.optim.adamw import make_adamw


def build_optimizer(cfg: OptimizerSection, model: torch.nn.Module, device: torch.device, lr: float):
    """``--optimizer torch`` / ``ours``: AdamW on everything (torch's fused one, or optim/adamw.py's). ``muon``: Muon on
    the hidden matrices, torch's AdamW on the rest.

    Weight decay goes to matrices and embeddings, not to the norm gains. Every group starts at ``lr``; the
    trainer sets each group's lr from the schedule before each step (Muon's update is scaled to AdamW's RMS, so
    one lr serves both: see train/optim/muon.py).
    """
    hidden = []
    if cfg.name == "muon":
        hidden = [p for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2]
    in_muon = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in in_muon]
    adamw = make_adamw(
        "ours" if cfg.name == "ours" else "torch",
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        device,
        lr=lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    if not hidden:
        return adamw
    muon = Muon(hidden, lr=lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return Optimizers(muon, adamw)


class Optimizers:
    """Several optimizers stepped, zeroed, checkpointed and scheduled as one (``param_groups`` spans them all)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict):
        saved = state.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not this optimizer's (was it --optimizer ours?)")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
