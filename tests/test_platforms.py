"""Windows and macOS on the CPU path, checked on Linux by faking the platform: the one lock (files.try_lock) takes
msvcrt's on Windows and never imports fcntl there, flock elsewhere; --device mps is chosen only where torch has it."""

import errno
import fcntl
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from smollm_stack import files
from smollm_stack.files import TMP_MARK, write_atomic
from smollm_stack.train.config import TrainConfig
from smollm_stack.train.parallel.distributed import resolve_device
from smollm_stack.train.store.rundir import LOCK_FILE, RunDir


@pytest.fixture
def windows(monkeypatch):
    """files on a pretend Windows: an msvcrt whose byte locks are flock underneath, and no fcntl to import."""
    calls = []

    def locking(fd, mode, nbytes):
        calls.append((os.lseek(fd, 0, os.SEEK_CUR), mode, nbytes))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EACCES, "Permission denied") from None  # what msvcrt raises for a held lock

    msvcrt = types.SimpleNamespace(LK_NBLCK=2, locking=locking)
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    monkeypatch.setattr(files, "PLATFORM", "win32")
    return calls


def test_windows_run_lock_uses_msvcrt_past_the_data(windows, tmp_path):
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    first.lock()
    try:
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()}\\)"):  # the pid is readable
            second.lock()
    finally:
        first.close()
    assert windows[0] == (files.WINDOWS_LOCK_OFFSET, 2, 1)  # one byte far past the pid, non-blocking
    assert not (tmp_path / "run").exists()  # created by the run and left empty: removed again
    RunDir(tmp_path / "run2").lock()
    assert (tmp_path / "run2" / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # written at 0, not at the lock's byte


def test_windows_temporary_files_live_while_locked(windows, tmp_path, monkeypatch):
    def publish_closed(tmp, path, exclusive):  # Windows renames no open file
        fds = Path("/proc/self/fd")
        assert not [fd for fd in fds.iterdir() if fd.exists() and fd.resolve() == Path(tmp)]  # (listdir's own fd goes)
        published.append(path)
        real_publish(tmp, path, exclusive)

    real_publish, published = files.publish, []
    monkeypatch.setattr(files, "publish", publish_closed)
    out = tmp_path / "ids.npy"
    stale, live = tmp_path / f"ids.npy{TMP_MARK}dead", tmp_path / f"ids.npy{TMP_MARK}live"
    stale.write_bytes(b"a killed writer's")
    fd = os.open(live, os.O_CREAT | os.O_RDWR)
    assert files.try_lock(fd)
    try:
        write_atomic(out, b"new")
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists() and out.read_bytes() == b"new" and published == [out]
    assert len(windows) == 4  # the live one here, then remove_stale on it (refused) and the dead one, the writer


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_posix_lock_is_flock(platform, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    monkeypatch.setattr(files, "PLATFORM", platform)
    a, b = (os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR) for _ in range(2))
    try:
        assert files.try_lock(a) and not files.try_lock(b)
    finally:
        os.close(a), os.close(b)


def test_the_trainer_imports_without_fcntl():
    code = "import sys; sys.modules['fcntl'] = None; import smollm_stack.train.loop, smollm_stack.train.lm"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_device_mps_only_where_torch_has_it(monkeypatch, capsys):
    assert TrainConfig(device="mps").system.device == "mps"
    with pytest.raises(ValueError, match="cuda:N or mps"):
        TrainConfig(device="metal")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device mps needs Apple silicon"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    assert resolve_device("mps") == torch.device("mps")
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in capsys.readouterr().err
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    assert resolve_device("mps") == torch.device("mps") and not capsys.readouterr().err
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")  # never mps


def test_the_tokenizer_command_runs_without_the_resource_module(monkeypatch, tmp_path, capsys):
    """Windows has no `resource`: `smollm tokenizer` then reports its wall time without the peak memory."""
    from smollm_stack.tokenizer import Tokenizer
    from smollm_stack.tokenizer.__main__ import main as tokenizer_main

    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(tmp_path / "tok")
    (tmp_path / "text.txt").write_text("a few words to encode\n")
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises, as on Windows
    argv = ["encode", str(tmp_path / "text.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "x")]
    assert tokenizer_main([*argv, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "wall time" in out and "peak memory" not in out
