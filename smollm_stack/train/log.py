"""What a run reports: ``metrics.jsonl`` rows, a console line per interval, loss plots, optional wandb, and MFU."""

import io
import json
import math
from pathlib import Path

import torch

from smollm_stack.files import open_append, write_atomic
from smollm_stack.train.loggers import Dashboards
from smollm_stack.train.store.rundir import RunDir

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


class _NoBar:
    """What the trainer asks of a progress bar, doing nothing: where tqdm is not installed."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **values) -> None: ...

    def close(self) -> None: ...


def _tqdm():
    """tqdm's bar class, or None where tqdm is not installed (a bare GPU image): progress then shows nothing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def progress_bar(**tqdm_args):
    """A tqdm bar, or one that shows nothing where tqdm is not installed."""
    tqdm = _tqdm()
    return _NoBar() if tqdm is None else tqdm(**tqdm_args)


def console(line: str) -> None:
    """Print a line without tearing a progress bar (tqdm.write), or plainly where tqdm is not installed."""
    tqdm = _tqdm()
    (print if tqdm is None else tqdm.write)(line)


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None when unknown (a CPU, or a card not in the table): no MFU then."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl. A torn last line (the run was killed mid-write) is dropped; a damaged line
    before it is an error naming the file and line."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ValueError(f"{path}, line {i}, is not a JSON row ({e}): fix or delete that line") from None
    return rows


class RunLogger:
    """Appends metrics rows to the run's ``metrics.jsonl`` (and --logger's dashboards), prints them, and redraws
    the loss plots.

    On resume the rows after the checkpoint's step (logged by the interrupted run after its last save) are dropped,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, run: RunDir, config: dict, resume_step: int | None = None, dashboards: list[str] = (),
                 project: str | None = None):  # fmt: skip
        self.run = run
        self.path = run.metrics
        self.rows = [r for r in read_metrics(run.path) if r["step"] <= resume_step] if resume_step is not None else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.warned_no_plots = False
        self.dashboards = Dashboards(list(dashboards), run, config, project)  # --logger (train/loggers.py)

    def log(self, row: dict):
        self.rows.append(row)
        with open_append(self.path) as f:
            f.write(json.dumps(row) + "\n")
        self.dashboards.log(row)
        console(format_row(row))

    def plot(self):
        """Redraw loss_steps.png and loss_time.png (train and val loss against steps and wall-clock seconds)."""
        try:
            import matplotlib
        except ImportError:
            if not self.warned_no_plots:
                console("no loss plots: matplotlib is not installed")
            self.warned_no_plots = True
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.rows if r.get("train_loss") is not None]
        val = [r for r in self.rows if r.get("val_loss") is not None]
        factor = next((r["val_bpb"] / r["val_loss"] for r in val if r.get("val_bpb") and r["val_loss"]), None)
        for x_key, x_label in (("step", "step"), ("time_s", "wall-clock seconds")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            ax.plot([r[x_key] for r in train], [r["train_loss"] for r in train], label="train", lw=1)
            ax.plot([r[x_key] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
            ax.set_xlabel(x_label)
            ax.set_ylabel("cross-entropy loss (nats/token)")
            if factor:  # a fixed multiple of the validation loss (train/metrics.py)
                ax.secondary_yaxis("right", functions=(lambda y: y * factor, lambda b: b / factor)).set_ylabel(
                    "validation bits per byte"
                )
            ax.set_title(self.run.path.name)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=100)
            plt.close(fig)
            write_atomic(self.run.plot(x_key), png.getvalue())
        self.plot_tasks(plt)

    def plot_tasks(self, plt):
        """Redraw tasks.png (--eval-tasks: each task's acc_norm, solid, and acc, dashed, against steps)."""
        tasks = sorted({k.removesuffix("_acc_norm") for r in self.rows for k in r if k.endswith("_acc_norm")})
        if not tasks:
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for task in tasks:
            rows = [r for r in self.rows if r.get(f"{task}_acc_norm") is not None]
            steps = [r["step"] for r in rows]
            (line,) = ax.plot(steps, [r[f"{task}_acc_norm"] for r in rows], "o-", ms=3, label=f"{task} acc_norm")
            ax.plot(steps, [r[f"{task}_acc"] for r in rows], "--", color=line.get_color(), lw=1, label=f"{task} acc")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{self.run.path.name}: downstream tasks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        write_atomic(self.run.tasks_plot, png.getvalue())

    def close(self):
        self.dashboards.close()


def format_row(row: dict) -> str:
    parts = [f"step {row['step']:>6}"]
    if row.get("train_loss") is not None:
        parts.append(f"loss {row['train_loss']:.4f}")
    if row.get("val_loss") is not None:
        bpb = "" if row.get("val_bpb") is None else f", {row['val_bpb']:.4f} bpb"
        parts.append(f"val {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f}{bpb})")
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.2e}")
    if row.get("grad_norm") is not None:
        parts.append(f"gnorm {row['grad_norm']:.3f}")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
        parts.append(f"{row['ms_per_step']:.1f} ms/step")
        if row.get("mfu") is not None:  # null without a known peak to compare to (a CPU, a card not in the table)
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
    return " | ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709
