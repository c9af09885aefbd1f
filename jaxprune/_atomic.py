"""Atomic file writes: readers see the old file or the new one, never a part of either.

One home for every file jaxprune writes (model files, the demo's checkpoints and results): a
temp file in the target's folder, locked, fsynced, then renamed over the target, with the umask's
permissions.
"""

from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

BINARY = getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | BINARY
_WRITE = os.O_WRONLY | BINARY
_CHUNK = 1 << 20


def _write_chunks(f, blob: bytes) -> None:
    for i in range(0, len(blob), _CHUNK):
        f.write(blob[i : i + _CHUNK])


def _temp_path(path: str) -> str:
    # One name per target: the next save of a path removes what a crashed save left.
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.jaxprune-tmp")


def _open_temp(tmp: str) -> int:
    """A locked, empty, new temp file with the umask's permissions; waits for a concurrent save.

    A file already at ``tmp`` is another save's, being written (its lock makes this one wait), or
    one a crashed save left (nobody holds its lock): that one is removed and created afresh.
    """
    while True:
        try:
            fd, fresh = os.open(tmp, _CREATE, 0o666), True
        except FileExistsError:
            try:
                fd, fresh = os.open(tmp, _WRITE), False
            except FileNotFoundError:
                continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            ours = os.path.samestat(os.fstat(fd), os.stat(tmp))
        except FileNotFoundError:
            ours = False
        except BaseException:
            os.close(fd)
            raise
        if ours and fresh:
            return fd
        if ours:
            os.unlink(tmp)
        os.close(fd)


def write_atomically(path: str, blob: bytes) -> None:
    """Temp file in the same directory, fsync, then rename: readers see the old file or the new.

    Through a symlink, the link's target is replaced and the link kept.
    """
    target = os.path.realpath(path)
    tmp = _temp_path(target)
    fd = _open_temp(tmp)
    try:
        with open(fd, "wb", closefd=False) as f:
            _write_chunks(f, blob)
        os.fsync(fd)
        if fcntl is None:  # Windows renames only closed files (and has no flock to hold)
            os.close(fd)
            fd = -1
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
