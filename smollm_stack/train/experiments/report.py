"""A suite's report: overlaid loss curves (PNG), a results table, and ``report.md`` stating the measured ranking.

Everything is read back from the suite directory (``suite.json`` and each variant's ``metrics.jsonl`` and
``summary.json``), so a report can be rebuilt at any time, also of a suite still running or partly failed. No
checkpoint is read. Each file is written whole or not at all and never through a symbolic link (smollm_stack.files).
"""

import io
import math
from pathlib import Path

from smollm_stack.files import make_dir, write_atomic
from smollm_stack.model import ModelConfig
from smollm_stack.train.config import complete_saved
from smollm_stack.train.experiments.runner import SUITE_FILE
from smollm_stack.train.log import read_metrics
from smollm_stack.train.store.rundir import RunDir, read_json, write_json

# (metrics key, axis label, file name) of the three x axes every suite is plotted against.
X_AXES = (
    ("step", "optimizer step", "loss_vs_steps.png"),
    ("tokens", "training tokens", "loss_vs_tokens.png"),
    ("time_s", "wall-clock seconds (evaluation included)", "loss_vs_time.png"),
)


def load_suite(suite_dir: str | Path) -> tuple[dict, list[dict]]:
    """(suite.json, rows): one row per variant with its note, summary (or None) and metrics rows."""
    suite_dir = Path(suite_dir)
    meta = read_json(suite_dir / SUITE_FILE)
    if meta is None:
        raise FileNotFoundError(f"{suite_dir / SUITE_FILE} not found: is {suite_dir} a suite directory?")
    rows = []
    for v in meta["variants"]:
        run_dir = RunDir(suite_dir / v["name"])
        summary = read_json(run_dir.summary)
        config = read_json(run_dir.config)
        recorded = next((s for s in meta.get("status", []) if s["name"] == v["name"]), None)  # the runner's word
        if summary is not None:
            status, message = summary["status"], summary.get("message", "")
        elif recorded is not None:
            status, message = recorded["status"], recorded["message"]
        else:
            status, message = ("unfinished" if config else "not run"), ""
        metrics = read_metrics(run_dir.path)
        rows.append({**v, "status": status, "message": message, "summary": summary, "metrics": metrics})
    return meta, rows


def ranked(rows: list[dict]) -> list[dict]:
    """Finished variants by best validation loss, then the diverged and the rest in suite order."""
    good = sorted((r for r in rows if r["status"] == "finished"), key=lambda r: r["summary"]["best_val_loss"])
    return good + [r for r in rows if r["status"] != "finished"]


def plot_suite(name: str, rows: list[dict], out_dir: Path) -> list[str]:
    """Overlay every variant's validation and training loss against steps, tokens and time; return the file names.

    Each figure has the whole runs on top and, below, their second half zoomed in, where the variants separate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    colors = plt.get_cmap("tab10")
    names = []
    for x_key, x_label, file_name in X_AXES:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.6))
        for col, loss in enumerate(("val_loss", "train_loss")):
            curves = []
            for i, row in enumerate(rows):
                points = [(r[x_key], r[loss]) for r in row["metrics"] if r.get(loss) is not None]
                if points:
                    curves.append((row, colors(i % 10), points))
            for zoom, ax in enumerate(axes[:, col]):
                _plot_panel(ax, curves, zoom=bool(zoom))
                what = "validation" if loss == "val_loss" else "training"
                ax.set_title(f"{name}: {what} loss" + (", zoomed on the second half" if zoom else ""))
                ax.set_xlabel(x_label)
                ax.set_ylabel("cross-entropy (nats/token)")
                ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        drawn, small = io.BytesIO(), io.BytesIO()
        fig.savefig(drawn, format="png", dpi=72)
        plt.close(fig)
        # A 128-colour palette loses nothing visible in a line plot and keeps the committed figures small (~3x).
        Image.open(drawn).convert("RGB").quantize(colors=128).save(small, format="png", optimize=True)
        write_atomic(out_dir / file_name, small.getvalue())
        names.append(file_name)
    return names


def _plot_panel(ax, curves: list, zoom: bool):
    """One panel of a figure: every curve, the y range fitted to the runs that did not diverge.

    The full view spans up to the median starting loss (a variant that starts far higher, like one without norms,
    or one that diverges, runs off the top); the zoomed view starts halfway through the shortest run.
    """
    kept = [pts for row, _, pts in curves if row["status"] != "diverged"] or [pts for _, _, pts in curves]
    ends = [pts[-1][0] for pts in kept]
    x_end = max(ends)
    x_start = min(ends) / 2 if zoom else 0.0  # from half the shortest run (wall-clock ends differ), so all show
    shown = [y for pts in kept for x, y in pts if x >= x_start and math.isfinite(y)]
    for row, color, pts in curves:
        diverged = row["status"] == "diverged"
        label = row["name"] + (" (diverged)" if diverged else "")
        ax.plot(
            [x for x, _ in pts],
            [y for _, y in pts],
            "o-" if len(pts) < 30 else "-",
            ms=2.5,
            lw=1.2,
            color=color,
            label=label,
        )
        if diverged:  # mark where the trainer stopped it
            ax.plot(pts[-1][0], pts[-1][1], "x", ms=9, color=color)
    if not shown:
        return
    low = min(shown)
    high = max(shown) if zoom else sorted(pts[0][1] for pts in kept)[len(kept) // 2]
    pad = 0.05 * (high - low) if high > low else 0.05
    ax.set_ylim(low - pad, high + pad)
    if zoom:
        ax.set_xlim(x_start, x_end * 1.02)


def table_rows(rows: list[dict]) -> list[dict]:
    """The results table as plain values (also written to results.json)."""
    out = []
    for r in ranked(rows):
        s = r["summary"] or {}
        if r["status"] == "diverged":  # its summary's val loss is from before it went wrong: not a result
            results = ("final_val_loss", "best_val_loss", "best_val_bpb", "tokens_per_s")
            s = {k: v for k, v in s.items() if k not in results}
        out.append(
            {
                "variant": r["name"],
                "change": r["note"],
                "status": r["status"],
                "params": s.get("params"),
                "steps": s.get("steps"),
                "tokens": s.get("tokens"),
                "final_val_loss": s.get("final_val_loss"),
                "best_val_loss": s.get("best_val_loss"),
                "best_val_bpb": s.get("best_val_bpb"),  # bits per byte: comparable across tokenizers
                "final_train_loss": s.get("final_train_loss"),
                "tokens_per_s": s.get("tokens_per_s"),
                "wall_s": s.get("wall_s"),
                "message": r["message"],
            }
        )
    return out


def markdown_table(table: list[dict]) -> str:
    def num(value, fmt):
        return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)

    lines = [
        "| # | variant | change | params | steps | tokens | final val | best val | best val bpb | final train "
        "| tokens/s | wall | status |",
        "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for i, t in enumerate(table, 1):
        lines.append(
            f"| {i if t['status'] == 'finished' else ''} | {t['variant']} | {t['change']} | {num(t['params'], ',')} "
            f"| {num(t['steps'], 'd')} | {num(t['tokens'], ',')} | {num(t['final_val_loss'], '.4f')} "
            f"| {num(t['best_val_loss'], '.4f')} | {num(t.get('best_val_bpb'), '.4f')} "
            f"| {num(t['final_train_loss'], '.4f')} "
            f"| {num(t['tokens_per_s'], ',.0f')} | {num(t['wall_s'], '.0f')} s "
            f"| {'**diverged**' if t['status'] == 'diverged' else t['status']} |"
        )
    return "\n".join(lines)


def ranking_text(table: list[dict]) -> str:
    """One sentence per fact: the order by best validation loss, the gap to the baseline, what diverged."""
    good = [t for t in table if t["status"] == "finished"]
    lines = []
    if good:
        order = " < ".join(f"{t['variant']} ({t['best_val_loss']:.3f})" for t in good)
        lines.append(f"Measured ranking by best validation loss (lower is better): {order}.")
        base = next((t for t in good if t["variant"] == "baseline"), None)
        if base is not None and len(good) > 1:
            deltas = ", ".join(
                f"{t['variant']} {t['best_val_loss'] - base['best_val_loss']:+.3f}" for t in good if t is not base
            )
            lines.append(f"Difference to the baseline in best validation loss: {deltas}.")
    for t in table:
        if t["status"] == "diverged":  # the trainer's message: "diverged at step N: train loss ...; stopped, ..."
            lines.append(f"**{t['variant']} diverged**: {t['message'].split(';')[0]}.")
        elif t["status"] != "finished":
            lines.append(f"{t['variant']}: {t['status']}, no result ({t['message'] or 'not run yet'}).")
    return "\n\n".join(lines)


def build_report(suite_dir: str | Path, out_dir: str | Path | None = None, notes: str | None = None) -> Path:
    """Write ``report.md``, the three loss figures and ``results.json`` to ``out_dir`` (default: <suite>/report).

    ``notes`` is markdown (e.g. the discussion of what the curves show) placed after the measured ranking.
    """
    suite_dir = Path(suite_dir)
    meta, rows = load_suite(suite_dir)
    out = make_dir(Path(out_dir) if out_dir is not None else suite_dir / "report", exist_ok=True)
    figures = plot_suite(meta["name"], rows, out)
    table = table_rows(rows)
    write_json(out / "results.json", table)
    base, machine = complete_saved(meta["base"]), meta["machine"]  # flat names, whichever version saved it
    model_args = ", ".join(f"{k}={v}" for k, v in base["model_args"].items()) or "none"
    device = ", ".join(machine["gpus"]) or f"{machine['cpu']} ({machine['cores']} cores), no GPU"
    context = base["context_length"] or ModelConfig.preset(base["model"]).context_length
    parts = [
        f"# Suite `{meta['name']}`",
        f"Run {meta['started']} – {meta.get('finished', 'unfinished')} on {device}; torch {machine['torch']}, "
        f"{meta['jobs']} variant(s) at a time (wall-clock and tokens/s are per variant, under that sharing).",
        f"Base config: preset `{base['model']}` (model overrides: {model_args}), "
        f"data `{base['train_data'] or 'embedded TinyStories excerpt'}`, batch {base['batch_size']} x "
        f"{base['grad_accum']} accumulated of {context} tokens, {base['steps']} steps, "
        f"max lr {base['max_lr']:g} -> min lr {base['min_lr']:g} ({base.get('schedule', 'cosine')}, "
        f"{base['warmup_steps']} warmup steps), {'Muon + ' if base.get('optimizer') == 'muon' else ''}"
        f"AdamW betas ({base['beta1']}, {base['beta2']}), weight decay {base['weight_decay']}, "
        f"clip {base['grad_clip']}, seed {base['seed']}, "
        f"{base['eval_batches']} validation batches (0: all) at the end, "
        f"{base.get('eval_subset_batches', base['eval_batches'])} every {base['eval_interval']} steps before. "
        "Each variant changes only what its row says.",
        "## Results",
        markdown_table(table),
        ranking_text(table),
    ]
    if notes:
        parts += ["## What the curves show", notes.strip()]
    parts.append("## Curves")
    parts += [f"![{f.removesuffix('.png').replace('_', ' ')}]({f})" for f in figures]
    write_atomic(out / "report.md", "\n\n".join(parts) + "\n")
    return out / "report.md"
