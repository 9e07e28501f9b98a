"""The run directory and its one owner: names, the lock, every file in it, atomic writes and checkpoint integrity.

A run directory holds (each name is defined here and nowhere else)::

    .lock                          flock'ed by the one process writing the run, for its lifetime
    config.json                    the run's TrainConfig, written before the first step: it makes the folder a run's
    metrics.jsonl                  one JSON row per report step
    loss_steps.png, loss_time.png  the loss plots
    tasks.png                      the downstream task scores, under --eval-tasks
    ckpt_XXXXXX.pt                 checkpoints (train.store.checkpoint's format), each with its ckpt_XXXXXX.pt.sha256
    predecay_XXXXXX.pt             a WSD run's last step at max_lr, which an extension re-decays from (never pruned)
    decayed_XXXXXX/                an extended WSD run's old decay: its checkpoints, metrics and summary
    ckpt_XXXXXX.dcp/               or, under --parallel fsdp, sharded ones (train.store.sharded's format)
    tokenizer/                     a copy of the tokenizer the run trains with
    sample.txt                     the story sampled at the end
    tensorboard/                   TensorBoard's event files, under --logger tensorboard
    checkpoints.json               the checkpoints this run wrote: the only files pruning may delete
    summary.json                   written last

and is in one of five states:

- "new": absent, or empty (a stale ``.lock`` aside);
- "finished": it has ``summary.json`` (the run finished or diverged); ``--resume`` with more steps extends it;
- "resumable": ``config.json`` and at least one checkpoint, no summary: killed or crashed mid-run;
- "dead": ``config.json`` but no checkpoint: it died before its first one, so it starts over from step 0 (under
  ``--resume``, or the command that started it);
- "foreign": files but no ``config.json``: not a run's, never written into without ``--force``, and with it never
  over them: a foreign file at any name above is refused, so everything of the run's names is the run's.

Every file is written through ``smollm_stack.files`` (a temporary file renamed into place, never through a link; the
lock and the metrics are opened with ``O_NOFOLLOW``). Nothing is ever deleted but the run's own temporary files and
the checkpoints ``checkpoints.json`` lists.

The lock is ``files.try_lock`` on ``.lock`` (``flock``, or ``msvcrt.locking`` on Windows): the OS drops it when its
process exits, however it exits, so a lock left by a killed run is never "held" and needs no cleaning. Everything
that writes files of a run (the trainer, the experiments runner through it) takes the lock first; readers (reports,
``budget``) need none.
"""

import itertools
import json
import os
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path

from smollm_stack.files import TMP_MARK, atomic_dir, make_dir, open_lock, refuse_link, try_lock, write_atomic
from smollm_stack.train.store.checkpoint import checksum_path, read_checkpoint

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLE_FILE = "sample.txt"
TOKENIZER_DIR = "tokenizer"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILES = {"step": "loss_steps.png", "time_s": "loss_time.png"}  # x axis -> file
TASKS_PLOT = "tasks.png"
CKPT_GLOB = "ckpt_*.pt"
PREDECAY_PREFIX = "predecay_"
SHARDED_GLOB = "ckpt_*.dcp"
WRITTEN_FILE = "checkpoints.json"
# Every name a run writes: a forced run refuses a foreign directory holding any of them (see "foreign" above).
RUN_NAMES = re.compile(
    r"(config\.json|metrics\.jsonl|summary\.json|sample\.txt|checkpoints\.json|tokenizer|tensorboard|tasks\.png|loss_\w+\.png"
    r"|(ckpt|predecay|decayed)_\d+.*)"
)
CORRUPT_SUFFIX = ".corrupt"  # a damaged checkpoint is set aside under this suffix, never deleted


def ckpt_name(iteration: int) -> str:
    return f"ckpt_{iteration:06d}.pt"


def sharded_ckpt_name(iteration: int) -> str:
    return f"ckpt_{iteration:06d}.dcp"


def write_json(path: Path, value: dict | list):
    """Write ``value`` to ``path`` atomically (smollm_stack.files: never through a link)."""
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when there is no such file; a damaged file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: byte {e.object[e.start]:#04x} at offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(value).__name__}")
    return value


def newest_intact(paths: list[Path], load, main: bool = True) -> tuple[Path, object] | tuple[None, None]:
    """(path, ``load(path)``) of the newest of ``paths`` (oldest first) that loads, or (None, None) when there are none.

    ``load`` raises ValueError saying what is wrong with a damaged checkpoint (checksum mismatch, truncated, not a
    checkpoint). Each damaged newer one is set aside as ``*.corrupt`` (by the ``main`` process; never deleted) with a
    warning, and the next older one tried; when none is intact, that is an error listing each one's damage.
    """
    damaged = []
    for path in reversed(paths):
        try:
            loaded = load(path)
        except ValueError as e:
            damaged.append((path, str(e)))
            continue
        for bad, reason in damaged if main else ():
            aside = bad.with_name(bad.name + CORRUPT_SUFFIX)
            os.replace(bad, aside)
            print(f"warning: {reason}; set aside as {aside.name}, resuming from {path.name}", file=sys.stderr)
        return path, loaded
    if damaged:
        raise ValueError(f"cannot resume: no intact checkpoint ({'; '.join(reason for _, reason in damaged)})")
    return None, None


def new_run_path(preset: str, root: str | Path = "runs") -> Path:
    """Create and return ``runs/<preset>-<date-time>``, with ``-2``, ``-3``, ... if a run started in the same second.

    ``mkdir`` either creates the folder or fails, atomically, so two runs started at once never get the same one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = f"{preset}-{datetime.now():%Y%m%d-%H%M%S}"
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


class RunDir:
    """One run directory: its file names, its state, its lock and its checkpoints."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / CONFIG_FILE
        self.metrics = self.path / METRICS_FILE
        self.summary = self.path / SUMMARY_FILE
        self.sample = self.path / SAMPLE_FILE
        self.tokenizer = self.path / TOKENIZER_DIR
        self.tensorboard = self.path / TENSORBOARD_DIR
        self.tasks_plot = self.path / TASKS_PLOT
        self.written = self.path / WRITTEN_FILE
        self._lock = None  # the open .lock file while we hold it
        self._created = False  # whether this process made the folder (then it removes it if it wrote nothing)

    def __str__(self) -> str:
        return str(self.path)

    def plot(self, x_key: str) -> Path:
        return self.path / PLOT_FILES[x_key]

    # ---- state ----------------------------------------------------------------------------------------------------

    def state(self) -> str:
        """One of "new", "finished", "resumable", "dead" or "foreign" (see the module docstring)."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file, not a run directory: choose another --out-dir")
        if not self.path.is_dir() or not self.entries():
            return "new"
        if not self.config.is_file():
            return "foreign"
        if self.summary.is_file():
            return "finished"
        return "resumable" if self.checkpoints() or self.sharded_checkpoints() else "dead"

    def entries(self) -> list[str]:
        """The names in the folder, its lock aside."""
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE) if self.path.is_dir() else []

    # ---- the lock -------------------------------------------------------------------------------------------------

    def lock(self):
        """Take the run's exclusive lock (creating the folder if needed); a second holder gets a ValueError."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file, not a run directory: choose another --out-dir")
        try:
            self.path.mkdir(parents=True)
            self._created = True
        except FileExistsError:  # (perhaps by a racing run: the lock decides)
            pass
        f = open_lock(self.path / LOCK_FILE)  # never through a planted link
        if not try_lock(f.fileno()):
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ValueError(
                f"{self.path} is in use by another run (pid {holder}): wait for it to end, or choose another --out-dir"
            )
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f

    def check_alive(self):
        """Raise unless the folder we locked is still there (not deleted, moved or replaced under the run)."""
        try:
            alive = os.stat(self.path / LOCK_FILE).st_ino == os.fstat(self._lock.fileno()).st_ino
        except OSError:
            alive = False
        if not alive:
            raise ValueError(f"the run directory {self.path} was deleted or moved while the run wrote it: stopped")

    def close(self):
        """Release the lock; a folder this process created and left empty is removed again."""
        if self._lock is None:
            return
        empty = self._created and not self.entries()
        if empty and os.name != "nt":  # removed while still held, so that no racing run takes it in between
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        self._lock.close()
        self._lock = None
        if empty:  # (Windows removes no open file: there, only now)
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.path.rmdir()

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def checkpoint(self, iteration: int) -> Path:
        return self.path / ckpt_name(iteration)

    def checkpoints(self) -> list[Path]:
        """The run's checkpoints, oldest first (names carry the zero-padded iteration)."""
        return sorted(self.path.glob(CKPT_GLOB))

    def predecay(self, iteration: int) -> Path:
        return self.path / (PREDECAY_PREFIX + ckpt_name(iteration).removeprefix("ckpt_"))

    def archive_decay(self, step: int, end: int) -> Path:
        """Move the checkpoints after ``step`` aside, with copies of the metrics and summary of the decay ending at
        ``end`` (the resumed run then truncates its own copies)."""
        archive = make_dir(self.path / f"decayed_{end:06d}", exist_ok=True)
        for path in self.checkpoints():
            if int(path.stem.removeprefix("ckpt_")) > step:
                for f in (path, checksum_path(path)):
                    if f.is_file():
                        refuse_link(archive / f.name)
                        os.replace(f, archive / f.name)
        for f in (self.metrics, self.summary):
            if f.is_file():
                write_atomic(archive / f.name, f.read_bytes())
        return archive

    def sharded_checkpoint(self, iteration: int) -> Path:
        return self.path / sharded_ckpt_name(iteration)

    def sharded_checkpoints(self) -> list[Path]:
        """The run's sharded checkpoint directories, oldest first."""
        return sorted(p for p in self.path.glob(SHARDED_GLOB) if p.is_dir())

    def written_checkpoints(self) -> list[str]:
        """The names of the checkpoints this run wrote (``checkpoints.json``), oldest first."""
        names = (read_json(self.written) or {}).get("written", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and RUN_NAMES.fullmatch(n) for n in names):
            raise ValueError(f"{self.written} is damaged: expected a list of checkpoint names under 'written'")
        return sorted(set(names))

    def record(self, path: Path):
        """Note a checkpoint this run just wrote: the pruner may delete it later."""
        write_json(self.written, {"written": sorted({*self.written_checkpoints(), path.name})})

    def prune(self, keep: int):
        """Delete all but the newest ``keep`` of the checkpoints this run wrote; never another file."""
        names = [n for n in self.written_checkpoints() if (self.path / n).exists() or (self.path / n).is_symlink()]
        for name in names[:-keep]:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
                checksum_path(path).unlink(missing_ok=True)
        write_json(self.written, {"written": names[-keep:]})

    def adopt_checkpoints(self):
        """A run from before ``checkpoints.json`` existed: its checkpoints are its own (its config.json says so)."""
        if not self.written.exists() and self.config.is_file():
            mine = [p.name for p in (*self.checkpoints(), *self.sharded_checkpoints())]
            write_json(self.written, {"written": mine})

    def clean_tmp(self):
        """Remove what killed writers left: temporary checkpoint and JSON files, checksums of no checkpoint.

        Only called under the lock, so no live writer of this run owns them.
        """
        for tmp in [*self.path.glob("*" + TMP_MARK + "*"), *self.path.glob(SHARDED_GLOB + ".tmp")]:
            if not RUN_NAMES.fullmatch(tmp.name.split(TMP_MARK)[0]):
                continue  # a foreign file's, in a directory shared under --force
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
        for checksum in self.path.glob("ckpt_*.pt.sha256"):
            if not checksum.with_suffix("").is_file():
                checksum.unlink()

    def latest_checkpoint(self, map_location="cpu") -> tuple[Path, dict] | tuple[None, None]:
        """The newest intact checkpoint (path, dict), or (None, None) when the run has none (``newest_intact``)."""
        return newest_intact(self.checkpoints(), lambda path: read_checkpoint(path, map_location=map_location))

    # ---- the tokenizer copy ---------------------------------------------------------------------------------------

    def copy_tokenizer(self, tok_dir: Path):
        """Copy the tokenizer into the run (the run dir alone is then enough to sample), once."""
        if not self.tokenizer.exists():
            atomic_dir(self.tokenizer, lambda tmp: shutil.copytree(tok_dir, tmp, dirs_exist_ok=True))


def open_run(out_dir: str | None, resume: str | None, preset: str, force: bool = False) -> RunDir:
    """The locked run directory a run writes, checked against what the flags ask for.

    ``resume`` None starts a new run (a fresh name when ``out_dir`` is None); a directory continues that run;
    "auto" continues the run in ``out_dir`` when there is one and starts it otherwise. A run that died before its
    first checkpoint starts over under ``--resume``. A folder with other files is refused without ``force``. The
    state is checked again once the lock is held: another process may have written the folder in between.
    """
    if resume == "auto" and out_dir is None:
        raise ValueError("--resume auto needs --out-dir: the run to continue, or to start if it does not exist")
    path = out_dir if resume in (None, "auto") else resume
    run = RunDir(path if path is not None else new_run_path(preset))
    _check_state(run, resume, force)  # before the lock writes anything into a folder that is not ours
    run._created = path is None
    run.lock()
    try:
        _check_state(run, resume, force)
    except BaseException:
        run.close()
        raise
    run.clean_tmp()
    run.adopt_checkpoints()
    return run


def _check_state(run: RunDir, resume: str | None, force: bool):
    state = run.state()
    if state == "new" and resume not in (None, "auto"):
        raise FileNotFoundError(f"cannot resume: {run.path} holds no run")
    if state == "foreign" and not force:
        shown = ", ".join(run.entries()[:4])
        raise ValueError(
            f"--out-dir {run.path} holds files that are not a run's ({shown}): choose another --out-dir, "
            "or --force to write the run among them"
        )
    ours = [name for name in run.entries() if RUN_NAMES.fullmatch(name)]
    for name in ours:  # refused now, not when the run comes to write it (smollm_stack.files refuses it then too)
        refuse_link(run.path / name)
    if state == "foreign" and ours:
        raise ValueError(
            f"--out-dir {run.path} holds files with the names a run writes ({', '.join(ours[:4])}): --force writes "
            "a run among other files, never over them: move those, or choose another --out-dir"
        )
    if state in ("finished", "resumable") and resume is None:
        raise ValueError(
            f"{run.path} already holds a run ({state}): --resume {run.path} (or --resume auto) to continue it, "
            "or pick another --out-dir"
        )
