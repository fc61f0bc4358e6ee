"""Locks between processes on one machine: an exclusive `flock` on a small file.

    with FileLock(folder / ".export.lock"):      wait for the other process, then do the short critical part
    with folder_writer(out_dir):                 be the only writer of a folder, or a UserError naming the other

The kernel drops a process's locks when it exits, however it ends (SIGKILL included), so a lock is never
stale and the lock files can stay where they are. A lock is re-entrant within a process: flock locks belong
to an open file, and a second open of the same file in one process would wait for the first forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from shared.errors import UserError

WRITER_LOCK = ".writer.lock"  # folder_writer's lock file, inside the folder it guards

_held: dict[Path, list] = {}  # lock file -> [descriptor, depth] for the locks this process holds


class FileLock:
    """An exclusive lock on the file `path` (made when missing, left in place)."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock, waiting for another holder unless `blocking` is False; False when it is taken."""
        held = _held.get(self.path)
        if held is not None:
            held[1] += 1
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            return False
        except BaseException:
            os.close(descriptor)
            raise
        _held[self.path] = [descriptor, 1]
        return True

    def release(self) -> None:
        held = _held[self.path]
        held[1] -= 1
        if held[1] == 0:
            del _held[self.path]
            os.close(held[0])  # closing the last descriptor of the open file drops the flock

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def folder_writer(folder: Path) -> Iterator[None]:
    """Hold `folder` for writing: a second process asking for it gets a one-line UserError naming the pid
    and host of the one writing (recorded in the lock file), instead of both writing the same files."""
    folder = Path(folder)
    lock = FileLock(folder / WRITER_LOCK)
    if not lock.acquire(blocking=False):
        raise UserError(f"{folder} is being written by {_holder(lock.path)}; wait for it or choose another folder")
    try:
        if _held[lock.path][1] == 1:  # say who writes, for the message above
            descriptor = _held[lock.path][0]
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        lock.release()


def _holder(path: Path) -> str:
    try:
        pid, host = path.read_text(encoding="utf-8").split()
    except (OSError, ValueError):  # the holder has not written its name yet
        return "another process"
    return f"pid {pid} on {host}"
