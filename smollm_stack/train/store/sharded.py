"""Sharded checkpoints (``--parallel fsdp``), read without running code.

A sharded checkpoint is a step directory, written by every rank with ``torch.distributed.checkpoint`` (DCP)::

    ckpt_XXXXXX.dcp/
        .metadata, __R_0.distcp     DCP's: the global shapes, and rank R's shards of model and optimizer
        meta.pt                     rank 0: iteration, model and train config, RNG, sampler state, elapsed_s
        manifest.json               rank 0, last: the SHA-256 of every other file

Loading one runs no code, whoever wrote it: DCP's own reader unpickles ``.metadata`` and its planner unpickles the
non-tensor entries with ``weights_only=False``, and the manifest beside them proves integrity, not authorship. So we
read through ``SafeReader``, whose unpickler builds only DCP's metadata dataclasses, ``torch.Size``, dtypes and
paths (any other global, a ``__reduce__`` payload among them, is refused before it is called) and which accepts only
the manifest's own ``__R_N.distcp`` files as storage, and ``SafePlanner``, which loads every non-tensor entry with
``weights_only=True`` first. Tensors DCP already loads with ``weights_only=True``.

It is written as ``ckpt_XXXXXX.dcp.tmp`` and renamed when complete, so a crash leaves the previous one intact.
Each rank hashes (and on load verifies) its share of the files, in parallel. DCP stores each tensor with its global
shape, so any number of processes can load it: W ranks reshard it, one process (``--parallel fsdp`` without
torchrun, or ``consolidate``) reads whole tensors. RNG state is rank 0's: every rank seeds alike and the trainer
draws nothing per rank (its batches are a function of (seed, step)).

    smollm consolidate runs/x/ckpt_000200.dcp --out ckpt.pt   # one file, for smollm lm
"""

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)

from smollm_stack.files import atomic_file, make_dir, refuse_link, write_atomic
from smollm_stack.model import ModelConfig, TransformerLM
from smollm_stack.train.store.checkpoint import checksum_path, save_checkpoint, set_rng_state, sha256_file
from smollm_stack.train.parallel.distributed import Dist
from smollm_stack.train.optim.builder import Optimizers
from smollm_stack.train.store.rundir import newest_intact

META_FILE = "meta.pt"
MANIFEST_FILE = "manifest.json"


# ---- sharded checkpoints ----------------------------------------------------------------------------------------


def save_sharded(path: Path, model, optimizer, meta: dict, info: Dist):
    """Every rank: write its shards of ``model`` and ``optimizer`` into the step directory ``path`` (see above)."""
    tmp = path.with_name(path.name + ".tmp")
    if info.main:
        if tmp.is_symlink() or tmp.is_file():
            tmp.unlink()  # not ours to follow (the run's own name, under its lock)
        elif tmp.exists():
            shutil.rmtree(tmp)  # a killed save's leftovers
        make_dir(tmp)  # a real folder: DCP's writers then never write through a planted link
    info.barrier()
    model_state, optimizer_state = get_state_dict(model, torch_optimizers(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp, no_dist=not info.enabled)
    mine = sorted(tmp.glob(f"__{info.rank}_*.distcp"))  # DCP names rank R's files __R_<n>.distcp
    digests = {}
    for part in info.gather({p.name: sha256_file(p) for p in mine}):
        digests.update(part)
    if info.main:
        with atomic_file(tmp / META_FILE) as f:
            torch.save(meta, f)
        for name in (".metadata", META_FILE):
            digests[name] = sha256_file(tmp / name)
        write_atomic(tmp / MANIFEST_FILE, json.dumps({"files": digests}, indent=2, sort_keys=True) + "\n")
        refuse_link(path)
        if path.exists():
            shutil.rmtree(path)  # an older save of this very step, from before a resume
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    info.barrier()  # nobody reads or prunes checkpoints before the rename


def damage(path: Path, info: Dist) -> str | None:
    """Why the step directory ``path`` is not an intact sharded checkpoint, or None. Every rank calls it.

    Rank r verifies the checksums of files r, r + W, ...; all ranks return the same answer.
    """
    problem = None
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{path} has no readable {MANIFEST_FILE} ({e.__class__.__name__})"
        files = {}
    if not problem and not {".metadata", META_FILE} <= files.keys():
        problem = f"{path}/{MANIFEST_FILE} does not list .metadata and {META_FILE}"
    for name in sorted(files)[info.rank :: info.world_size]:
        if problem:
            break
        if not (path / name).is_file():
            problem = f"{path} is incomplete: {name} is missing"
        elif sha256_file(path / name) != files[name]:
            problem = f"{path} is damaged: the SHA-256 of {name} differs from its manifest's"
    return next((p for p in info.gather(problem) if p), None)


def read_meta(path: Path) -> dict:
    """The step directory's meta.pt, loaded with weights_only=True; anything else is a ValueError naming it."""
    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path / META_FILE} holds objects other than data: refused") from None
    except Exception as e:  # whatever torch.load meets in a damaged or foreign file
        raise ValueError(f"{path / META_FILE} is not readable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not {"iteration", "model_config", "train_config", "rng"} <= meta.keys():
        raise ValueError(f"{path / META_FILE} is not a sharded checkpoint's meta.pt")
    return meta


def latest_sharded(paths: list[Path], info: Dist) -> tuple[Path, dict] | tuple[None, None]:
    """The newest intact sharded checkpoint among ``paths`` (oldest first) and its meta, or (None, None): the rules of
    single-file ones (rundir.newest_intact). Every rank calls it; each verifies its share of every step directory."""

    def load(path: Path) -> dict:
        reason = damage(path, info)
        if reason is not None:
            raise ValueError(reason)
        return read_meta(path)

    found = newest_intact(paths, load, info.main)
    if found[0] is not None:
        info.barrier()  # nobody reads a step directory before rank 0 has set the damaged ones aside
    return found


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: Dist):
    """Load the step directory's model and optimizer state into ``model`` (sharded or not) and ``optimizer``."""
    optimizers = torch_optimizers(optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizers)  # the layout to fill (optimizer state created)
    state = {"model": model_state, "optimizer": optimizer_state}
    SafeReader(path).read_metadata()  # refuse a hostile .metadata here, before DCP logs our error as a traceback
    with warnings.catch_warnings():  # DCP warns that one process reads alone: here that is the intent
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        try:
            dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=not info.enabled)
        except dcp.CheckpointException as e:  # a rank's ValueError, wrapped
            reasons = {str(err) for err, _ in e.failures.values()}
            raise ValueError(f"cannot load {path}: {'; '.join(sorted(reasons))}") from None
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ---- loading without running code -------------------------------------------------------------------------------

# What DCP's .metadata pickles (torch 2.4-2.13), module -> names; torch dtypes are allowed besides.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}  # fmt: skip
SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")  # DCP's name for a rank's data file


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no checkpoint's metadata holds")
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by an unpickler that can only build metadata (see above)."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{path} is not a checkpoint's metadata: {e}") from None
        if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
            raise ValueError(f"{path} is not a checkpoint's metadata")
        for info in metadata.storage_data.values():
            if not SHARD_FILE.fullmatch(str(getattr(info, "relative_path", ""))) or info.transform_descriptors:
                raise ValueError(f"{path} points at {getattr(info, 'relative_path', '?')!r}, not a shard of its own")
        metadata.storage_meta = dcp_metadata.StorageMeta(load_id=self.load_id)
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, unpickling non-tensor entries (optimizer hyperparameters) only once a weights_only load
    of the same bytes has shown they hold nothing else."""

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError):
            raise ValueError(f"entry {read_item.dest_index.fqn} holds objects other than data: refused") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def torch_optimizers(optimizer) -> tuple[torch.optim.Optimizer, ...]:
    """The torch optimizers DCP's state-dict helpers take: Muon's and AdamW's of an ``Optimizers``, or the one.

    Their states are saved as one dict keyed by parameter name (Muon's ``momentum`` and AdamW's moments side by
    side), which is why a checkpoint reshards to any number of processes whichever optimizer wrote it.
    """
    return optimizer.optimizers if isinstance(optimizer, Optimizers) else (optimizer,)


def consolidate(step_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the sharded checkpoint ``step_dir`` as one train.store.checkpoint file (what ``smollm lm`` reads).

    ``out`` is created exclusively; ``force`` lets it replace a checkpoint of ours (one with a ``.sha256`` beside
    it), never another file.
    """
    from smollm_stack.train.config import make_config
    from smollm_stack.train.optim.builder import build_optimizer  # the trainer's own: the optimizer state's layout

    path, out = Path(step_dir), Path(out)
    if not path.is_dir():
        raise FileNotFoundError(f"no sharded checkpoint directory at {path}")
    refuse_link(out)
    if out.exists() and not force:
        raise FileExistsError(f"--out {out} exists: choose another name, or --force to replace it")
    if out.exists() and not checksum_path(out).is_file():
        raise ValueError(f"--out {out} is not a checkpoint we wrote (no {checksum_path(out).name}): not replacing it")
    reason = damage(path, Dist())
    if reason is not None:
        raise ValueError(reason)
    meta = read_meta(path)
    model = TransformerLM(ModelConfig(**meta["model_config"]))
    saved = make_config(meta["train_config"])
    optimizer = build_optimizer(saved.optimizer, model, torch.device("cpu"), saved.schedule.max_lr)
    load_sharded(path, model, optimizer, Dist())
    set_rng_state(meta["rng"])  # save_checkpoint records the current RNG state: make it the saved one
    extra = {k: v for k, v in meta.items() if k not in ("iteration", "rng")}
    save_checkpoint(model, optimizer, meta["iteration"], out, exclusive=not force, **extra)
    return out


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
