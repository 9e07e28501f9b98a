"""How every file of ours is written: never through a link, whole or not at all, and never over what we did not make.

Every writer in the package goes through these few functions (one owner for the concern):

- ``atomic_file(path)`` streams into a temporary file ``<name>.tmp-XXXX`` created exclusively in ``path``'s own
  folder, fsyncs it and renames it over ``path``. A rename replaces a symbolic link planted at ``path`` instead of
  following it, but we refuse such a link anyway, with an error naming it: it was put there by someone else.
  ``exclusive=True`` publishes with ``link(2)``, which fails when ``path`` exists, so two writers racing for one
  name cannot both succeed (no check-then-write window). A crash leaves the old file intact.
- ``open_append`` and ``open_lock`` open a file in place (``metrics.jsonl``, ``.lock``) with ``O_NOFOLLOW`` and
  refuse anything but a plain file with one name (a hard link planted in a run would let us write to its twin).
- A writer holds ``flock`` on its temporary file while it writes. Temporary files of killed writers are left
  unlocked, so the next writer of the same name removes them (``remove_stale``); a live writer's are kept.

Errors are ``ValueError`` (``FileExistsError`` for an exclusive name that exists) with one line naming the path:
the commands print them as ``error: ...`` and exit 2.
"""

import contextlib
import errno
import fcntl
import glob
import os
import stat
from pathlib import Path

TMP_MARK = ".tmp-"  # a temporary file of NAME is NAME.tmp-XXXXXXXX, in NAME's folder


class WriteError(ValueError):
    """A write failed (a full or read-only disk): ``path`` is left as it was, ``reason`` says why."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def refuse_link(path: str | os.PathLike):
    """Raise if ``path`` is a symbolic link: nothing of ours is written through (or over) one."""
    if os.path.islink(path):
        raise ValueError(f"{path} is a symbolic link: refusing to write through it (remove it, or choose another path)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale(path: str | os.PathLike):
    """Remove the temporary files of killed writers of ``path`` (unlocked ``<name>.tmp-*`` files in its folder)."""
    path = Path(path)
    for tmp in glob.glob(glob.escape(str(path)) + TMP_MARK + "*"):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # a link, or gone: not ours to touch
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer lives
                os.unlink(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, exclusive: bool):
    """Rename the finished file ``tmp`` (in ``path``'s folder) to ``path``: over it, or with ``exclusive`` only if
    ``path`` does not exist (``link(2)``, then the temporary name is removed); never onto a link."""
    refuse_link(path)
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists: choose another name, or --force to replace it") from None
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, exclusive: bool = False):
    """A binary file object whose contents become ``path`` when the block ends without an error (see above).

    An OSError of the write (a full disk) is a ValueError naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    refuse_link(path)
    remove_stale(path)
    tmp = f"{path}{TMP_MARK}{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, _NEW, 0o666 & ~_umask())
    except OSError as e:
        raise WriteError(path, e.strerror or str(e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live for remove_stale, until closed
        with os.fdopen(fd, "w+b") as f:  # readable too: a checkpoint hashes what it wrote
            yield f
            f.flush()
            os.fsync(f.fileno())
            publish(tmp, path, exclusive)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, FileExistsError):
            raise
        raise WriteError(path, e.strerror or str(e)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, exclusive: bool = False):
    """Write ``data`` (text is UTF-8) to ``path`` through ``atomic_file``."""
    with atomic_file(path, exclusive) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _open_plain(path: str | os.PathLike, flags: int):
    """An fd on the plain, singly linked file ``path`` (created if absent), never following a link."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666 & ~_umask())
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise ValueError(f"cannot open {path}: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = "a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a plain file"
        raise ValueError(f"{path} is {kind}: refusing to write to it (remove it)")
    return fd


def open_append(path: str | os.PathLike, text: bool = True):
    """``path`` opened for appending (created if absent), refusing links and anything but a plain file."""
    return os.fdopen(_open_plain(path, os.O_WRONLY | os.O_APPEND), "a" if text else "ab")


def open_lock(path: str | os.PathLike):
    """``path`` opened read-write for a lock file (created if absent, never truncated by opening)."""
    return os.fdopen(_open_plain(path, os.O_RDWR), "r+")


def make_dir(path: str | os.PathLike, exist_ok: bool = False) -> Path:
    """Create the folder ``path`` (its parents too); an existing one must be a real folder, not a link to one."""
    path = Path(path)
    refuse_link(path)
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists: choose another name, or --force to replace it") from None
    except OSError as e:
        raise ValueError(f"cannot create {path}: {e.strerror}") from None
    refuse_link(path)  # exist_ok: it may have been a link all along
    return path


_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
