"""How every file of ours is written: never through a link, whole or not at all, and never over what we did not make.

Every writer in the package goes through these few functions (one owner for the concern):

- ``atomic_file(path)`` streams into a temporary file ``<name>.tmp-XXXX`` created exclusively in ``path``'s own
  folder, fsyncs it and renames it over ``path``. A rename replaces a symbolic link planted at ``path`` instead of
  following it, but we refuse such a link anyway, with an error naming it: it was put there by someone else.
  ``exclusive=True`` publishes with ``link(2)``, which fails when ``path`` exists, so two writers racing for one
  name cannot both succeed (no check-then-write window). A crash leaves the old file intact.
- ``atomic_dir(path, build)`` builds a whole directory under a temporary name beside ``path`` and renames it into
  place: a crash, or a second process building the same one, never leaves half a directory.
- ``open_append`` and ``open_lock`` open a file in place (``metrics.jsonl``, ``.lock``) with ``O_NOFOLLOW`` and
  refuse anything but a plain file with one name (a hard link planted in a run would let us write to its twin).
- A writer holds a lock on its temporary file while it writes. Temporary files of killed writers are left
  unlocked, so the next writer of the same name removes them (``remove_stale``); a live writer's are kept.
- ``try_lock`` is the one lock of the package (these temporary files, the run directory's ``.lock``): ``flock`` on
  POSIX (Linux, macOS), ``msvcrt.locking`` on Windows, chosen by ``PLATFORM``; the OS drops either when its process
  ends, however it ends. Flags Windows lacks (``O_NOFOLLOW``...) are 0 there, and its files open in binary mode.

Errors are ``ValueError`` (``FileExistsError`` for an exclusive name that exists) with one line naming the path:
the commands print them as ``error: ...`` and exit 2.
"""

import contextlib
import errno
import glob
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"  # a temporary file of NAME is NAME.tmp-XXXXXXXX, in NAME's folder
PLATFORM = sys.platform  # which lock try_lock takes (a module name, so that tests can fake another OS)
# Windows' locks are mandatory: a lock on byte 0 would stop a second run from reading the holder's pid there, so
# its lock covers one byte far past any data we write (Windows lets a lock lie beyond the end of a file).
WINDOWS_LOCK_OFFSET = 2**40


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file ``fd`` without waiting: False if another holder has it.
    It lasts until ``fd`` is closed (or its process ends)."""
    if PLATFORM == "win32":
        import msvcrt

        where = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:  # held: EACCES or EDEADLOCK
            if e.errno not in (errno.EACCES, errno.EDEADLOCK):
                raise
            return False
        finally:
            os.lseek(fd, where, os.SEEK_SET)
        return True
    import fcntl  # POSIX only: never imported on Windows

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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
            fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
        except OSError:
            continue  # a link, or gone: not ours to touch
        try:
            stale = stat.S_ISREG(os.fstat(fd).st_mode) and try_lock(fd)  # False while its writer lives
        except OSError:
            stale = False
        finally:
            os.close(fd)  # before the unlink: Windows removes no open file (a tmp name is never reused)
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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
        try_lock(fd)  # marks it live for remove_stale, until closed (a new file: nobody else holds it)
        with os.fdopen(fd, "w+b") as f:  # readable too: a checkpoint hashes what it wrote
            yield f
            f.flush()
            os.fsync(f.fileno())
            if PLATFORM != "win32":  # renamed while locked, so no other writer's remove_stale can take it first
                publish(tmp, path, exclusive)
        if PLATFORM == "win32":  # Windows renames and removes no open file: once closed (that race stays open there)
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


def atomic_dir(final: str | os.PathLike, build, replace: bool = False):
    """Run ``build(tmp_dir)`` and rename the result to ``final``: a crash (or a racing rank) never leaves half a dir.

    An existing ``final`` is kept (someone else finished first: theirs is as good), or with ``replace`` swapped out.
    """
    final = Path(final)
    refuse_link(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + TMP_MARK))
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(tmp.name + "-old")
    if replace and final.exists():
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)



def _open_plain(path: str | os.PathLike, flags: int):
    """An fd on the plain, singly linked file ``path`` (created if absent), never following a link."""
    if not _NOFOLLOW:
        refuse_link(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY, 0o666 & ~_umask())
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


# POSIX flags that Windows lacks are 0 there (without O_NOFOLLOW, refuse_link before opening is the guard, one that
# a racing local user could beat); O_BINARY, Windows' alone, keeps its C runtime from writing "\r\n" for "\n".
_NOFOLLOW, _NONBLOCK, _CLOEXEC, _BINARY = (
    getattr(os, f"O_{n}", 0) for n in ("NOFOLLOW", "NONBLOCK", "CLOEXEC", "BINARY")
)
_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
