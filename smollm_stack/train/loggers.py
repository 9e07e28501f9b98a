"""Dashboards beside metrics.jsonl: ``--logger jsonl,tensorboard,trackio,wandb``.

``metrics.jsonl`` and the PNG plots are always written (train/log.py); each other name sends the same scalars,
every number of each metrics row (loss, lr, grad norm, tokens/s, MFU, val loss and bpb, task scores), keyed by
step, to one backend. Each backend is an optional extra (``pip install 'smollm-stack[tensorboard]'``, ...), checked
when the config is, so a missing package is one ``error:`` line before the run starts, not a crash mid-run.

- tensorboard: event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``); written by TensorBoard's own
  writer, the one file of a run that does not go through ``smollm_stack.files``.
- trackio: Hugging Face's local-first, wandb-compatible tracker (``trackio show``), project ``--logger-project``.
- wandb: Weights & Biases, project ``--logger-project`` (or the older ``--wandb-project``).
"""

import importlib.util
import numbers

BACKENDS = ("tensorboard", "trackio", "wandb")  # each the name of its package and of its extra; jsonl is always on
DEFAULT_PROJECT = "smollm-stack"


def parse_loggers(text: str) -> list[str]:
    """The dashboards named in a comma-separated ``--logger`` (jsonl aside), each installed, else a ValueError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name != "jsonl" and name not in BACKENDS:
            raise ValueError(f"--logger: unknown {name!r}; choose among jsonl, {', '.join(BACKENDS)}")
    dashboards = [n for n in dict.fromkeys(names) if n != "jsonl"]
    for name in dashboards:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--logger {name} needs the {name} package: pip install 'smollm-stack[{name}]'")
    return dashboards


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, without its step (the x axis) and its nulls (e.g. no MFU on a CPU)."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, run, config: dict, project: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.tensorboard))

    def log(self, values: dict[str, float], step: int):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a dashboard open during the run sees each report as it comes

    def close(self):
        self.writer.close()


class Trackio:
    def __init__(self, run, config: dict, project: str):
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=run.path.name, config=config, resume="allow")

    def log(self, values: dict[str, float], step: int):
        self.trackio.log(values, step=step)

    def close(self):
        self.trackio.finish()


class Wandb:
    def __init__(self, run, config: dict, project: str):
        import wandb

        self.run = wandb.init(project=project, name=run.path.name, config=config, resume="allow")

    def log(self, values: dict[str, float], step: int):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class Dashboards:
    """Every chosen backend, opened on the run; ``log`` sends a metrics row's scalars to each."""

    def __init__(self, names: list[str], run, config: dict, project: str | None = None):
        kinds = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": Wandb}
        self.backends = [kinds[name](run, config, project or DEFAULT_PROJECT) for name in names]

    def log(self, row: dict):
        values = scalars(row)
        for backend in self.backends:
            backend.log(values, row["step"])

    def close(self):
        for backend in self.backends:
            backend.close()
