"""Outputs that are complete or absent: atomic files, strict JSON, folders renamed into place, locks.

A process killed at any instant (``kill -9``, the out-of-memory killer, Ctrl-C) leaves no
half-written result behind under a final name:

* files are written to a temporary name next to the final one and renamed over it with
  `os.replace` (atomic on POSIX file systems: a reader sees the old file or the new one);
* whole output folders are written under a hidden temporary name (`output_folder`) and renamed
  to their final name when the last file is in, so a folder under its final name is complete;
* the temporary folder holds an `fcntl.flock` lock while it is written. The kernel releases a
  flock when its holder dies, so a leftover whose lock can be taken belongs to a dead process
  (`stale_leftovers`); one that is locked is still being written. Locks need a local file system
  or NFSv4 (Linux emulates flock with POSIX locks over NFS).

`dumps_json` writes strict JSON (RFC 8259 has no NaN or Infinity): non-finite numbers become null.

A crash of the whole machine is another matter: files renamed into place may then still be empty
unless their data was flushed first (`write_bytes(..., fsync=True)`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

LOCK_NAME = ".owner.lock"  # inside a folder being written: flocked by the writing process
PARTIAL = ".partial"       # hidden temporary folders: .<final name>.partial-<pid>-<random>


# --------------------------------------------------------------------------- files


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write `data` to `path` through a unique temporary file and `os.replace` (no half-written file).

    The temporary name is unique per call (`tempfile.mkstemp`), so concurrent writers of the same
    path never write into one temporary file: the last rename wins, whole. A killed process leaves
    at most a hidden `.<name>.*.tmp` file, never a partial `path`. `fsync` also flushes the data to
    disk before the rename, which a crash of the whole machine (not only of the process) needs on
    file systems that may commit the rename first; it costs a disk flush per file, so it is off by
    default.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """`write_bytes` of `text` encoded as UTF-8."""
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- strict JSON


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, +-inf) replaced by None, recursively.

    Walks dicts, lists and tuples; numpy scalars and 0-d arrays become Python numbers (numpy is
    not imported here: anything with `.item()` and no length is treated as a scalar).
    """
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0 and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of `obj`: NaN and infinities written as null (`finite_or_none`), never as the
    bare tokens NaN / Infinity that Python's json module writes by default and other parsers reject."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """`dumps_json(obj)` written atomically to `path` (`write_text`)."""
    write_text(path, dumps_json(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------- locks


class Lock:
    """An exclusive `fcntl.flock` on a file, released by `release` or when the process dies."""

    def __init__(self, path: str | os.PathLike, *, blocking: bool = True):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(self._fd)
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())  # for messages: who holds it

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_lock(path: str | os.PathLike) -> Lock | None:
    """The lock on `path` if no other holder has it now, else None (never waits)."""
    try:
        return Lock(path, blocking=False)
    except BlockingIOError:
        return None


def lock_holder(path: str | os.PathLike) -> int | None:
    """The process id written by the holder of the lock file `path` (None if unknown)."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- folders


CLAIM_LOCK = ".claim.lock"
_THREADS = threading.RLock()  # flock is per open file: threads of one process also take this
_HELD = threading.local()     # parents whose claim lock this thread holds (claim_lock is re-entrant)


@contextlib.contextmanager
def claim_lock(parent: str | os.PathLike) -> Iterator[None]:
    """Hold `parent/.claim.lock` (blocking, re-entrant in a thread): serialises creating, renaming and
    cleaning folders under `parent` among processes and threads. Held for milliseconds (a listing,
    a mkdir, a rename), never while outputs are written."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    key = str(parent.resolve())
    held = getattr(_HELD, "parents", None)
    if held is None:
        held = _HELD.parents = set()
    if key in held:
        yield
        return
    with _THREADS, Lock(parent / CLAIM_LOCK):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def is_partial(name: str) -> bool:
    """Whether `name` is the temporary name of a folder being written by `begin_folder`."""
    return name.startswith(".") and PARTIAL + "-" in name


def partial_target(name: str) -> str:
    """The final name that the temporary folder `name` was to be renamed to."""
    return name[1:name.index(PARTIAL + "-")]


def stale_leftovers(parent: str | os.PathLike) -> list[Path]:
    """Temporary folders under `parent` whose writer is gone: hidden `begin_folder` folders whose
    lock can be taken (the kernel dropped it when the writer died). A folder another process is
    writing is locked and not listed. Call it under `claim_lock(parent)` (`clean_leftovers` does)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    out = []
    for p in sorted(parent.iterdir()):
        if p.is_dir() and is_partial(p.name):
            lock = try_lock(p / LOCK_NAME)  # recreates a missing lock file: then nobody held it
            if lock is not None:
                lock.release()
                out.append(p)
    return out


def clean_leftovers(parent: str | os.PathLike, *, quiet: bool = False) -> list[Path]:
    """Delete `stale_leftovers(parent)` (incomplete outputs of killed processes); return them.

    A note naming each removed folder goes to stderr unless `quiet`.
    """
    with claim_lock(parent):
        gone = stale_leftovers(parent)
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
    if not quiet:
        for p in gone:
            print(f"note: removed {p}, the incomplete output of an interrupted run "
                  f"(it was to become {p.parent / partial_target(p.name)})", file=sys.stderr)
    return gone


class OutputFolder:
    """A folder being written: write into `path`; it appears as `final` once `commit` has run."""

    def __init__(self, path: Path, final: Path, lock: Lock):
        self.path, self.final, self._lock = path, final, lock
        self.committed = False

    def commit(self, final: str | os.PathLike | None = None) -> Path:
        """Rename `path` to `final` (default: the `final` given at the start); return it.

        Raises FileExistsError when a non-empty folder already has that name (the temporary folder
        stays, still locked, for another `commit` or `abort`). The rename is atomic: before it
        nothing is under the final name, after it everything is. The lock file is removed first
        (under the claim lock, so no cleaner looks meanwhile): a complete folder carries none, and
        a writer killed between the two steps leaves an unlocked, hence stale, temporary folder.
        """
        final = Path(final) if final is not None else self.final
        with claim_lock(final.parent):
            if final.exists() and not final.is_dir():
                raise FileExistsError(f"cannot rename {self.path} to {final}: a file has that name")
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            try:
                os.rename(self.path, final)  # replaces an empty folder, refuses a non-empty one
            except OSError as e:
                self._lock.release()
                self._lock = Lock(self.path / LOCK_NAME)  # still ours: locked again before anyone looks
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(f"cannot rename {self.path} to {final}: "
                                          f"{final} exists and is not empty") from e
                raise
            self._lock.release()
        self.path, self.final, self.committed = final, final, True
        return final

    def abort(self) -> None:
        """Delete the temporary folder (nothing is left under the final name)."""
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
            self._lock.release()


def begin_folder(final: str | os.PathLike) -> OutputFolder:
    """Start writing a folder that will be `final`: a hidden, locked temporary sibling
    `.<name>.partial-<pid>-<random>`. Finish with `commit()` or `abort()` (or use `output_folder`)."""
    final = Path(final)
    with claim_lock(final.parent):  # no cleaner sees the new folder before it is locked
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}-{os.getpid()}-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700: the finished folder gets the usual permissions
        return OutputFolder(tmp, final, Lock(tmp / LOCK_NAME))


@contextlib.contextmanager
def output_folder(final: str | os.PathLike, *, replace: bool = False) -> Iterator[OutputFolder]:
    """Write a folder completely or not at all: yields an `OutputFolder`; write into its `.path`.

    On normal exit the temporary folder is renamed to `final`; on an exception it is deleted; if
    the process is killed it stays as a hidden leftover that `clean_leftovers` recognises (called
    here first, for `final`'s parent). An existing non-empty `final` is an error (FileExistsError,
    raised before anything is written) unless `replace`: then the old folder is swapped out and
    deleted once the new one is in place. For numbered folders (v0, v1, ...) see
    `iepjax.runs.new_output`.

    Paths written into files of the folder should be relative to it (or name `.final`): `.path`
    is temporary.
    """
    final = Path(final)
    if final.exists() and not replace and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} exists and is not empty: choose another output folder")
    clean_leftovers(final.parent)
    out = begin_folder(final)
    try:
        yield out
    except BaseException:
        out.abort()
        raise
    with claim_lock(final.parent):
        old = None
        if replace and final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        try:
            out.commit()
        except BaseException:
            if old is not None:
                os.rename(old, final)
            out.abort()
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- checks before long work


class NotWritableError(PermissionError):
    """An output location this process cannot write to (raised before any long work)."""


def check_writable(path: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Raise NotWritableError with a clear message unless files can be created in folder `path`.

    `path` need not exist: its nearest existing ancestor must be a folder that accepts a new
    file. The check creates and deletes a small temporary file there (permission bits alone
    would not tell: a read-only mount, a full disk or an ACL refuse writes that the mode allows,
    and root ignores the mode). Call it before long work, so that a run does not compute for
    minutes and then fail on its first write. Returns `path` as a Path.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotWritableError(f"cannot write the {what} {path}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise NotWritableError(
            f"cannot write the {what} {path}: {probe} does not accept new files ({reason}); "
            "choose a writable location (for example another --results or --out folder) "
            "or fix its permissions") from e
    return path


__all__ = ["write_bytes", "write_text", "finite_or_none", "dumps_json", "write_json", "Lock", "try_lock",
           "lock_holder", "is_partial", "partial_target", "stale_leftovers", "clean_leftovers", "claim_lock",
           "OutputFolder", "begin_folder", "output_folder", "NotWritableError", "check_writable"]
