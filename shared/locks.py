"""Locks between processes: an `flock` on a small file, with a record of who holds it.

    with FileLock(folder / ".export.lock"):      wait for the other process, then do the short critical part
    with folder_writer(out_dir):                 be the only writer of a folder, or a UserError naming the other
    holder(path)                                 the record of the live process holding a lock file, or None

The kernel drops a process's locks when it exits, however it ends (SIGKILL included), so a lock left by a
dead process is simply taken over and the lock files can stay where they are. The holder writes a JSON
record (pid, host, start time, command) into the file, for the one-line messages that name it. A lock is
re-entrant within a process: flock locks belong to an open file, and a second open of the same file in one
process would wait for the first forever. Across machines this needs a file system whose flock works
between hosts (NFS on Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from shared.errors import UserError

WRITER_LOCK = ".writer.lock"  # folder_writer's lock file, inside the folder it guards

_held: dict[Path, list] = {}  # lock file -> [descriptor, depth] for the locks this process holds


def _key(path: Path) -> Path:
    path = Path(path)
    return path.parent.resolve() / path.name


class FileLock:
    """An exclusive lock on the file `path` (made when missing, left in place)."""

    def __init__(self, path: Path):
        self.path = _key(path)

    @property
    def held_here(self) -> bool:
        return self.path in _held

    def acquire(self, blocking: bool = True, wait_seconds: float = 0.0, argv: list[str] | None = None) -> bool:
        """Take the lock: wait for another holder when `blocking`, else try for up to `wait_seconds`;
        False when another process keeps it. The holder's record (with `argv` as its command) is written
        into the file when this process first takes it."""
        held = _held.get(self.path)
        if held is not None:
            held[1] += 1
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + wait_seconds
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(descriptor)
                        return False
                    time.sleep(0.1)
            _write_record(descriptor, argv)
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


def _write_record(descriptor: int, argv: list[str] | None) -> None:
    """Who holds the lock, written in place: the flock belongs to the file's inode, so it is never replaced."""
    command = " ".join([Path(sys.executable).name, *(argv if argv is not None else sys.argv)])
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": command}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
    with contextlib.suppress(OSError):  # a full disk must not stop a lock being taken: the record is for humans
        os.fsync(descriptor)


def read_record(path: Path) -> dict:
    """What a lock file says (empty if unreadable: a holder may be between truncating and writing it)."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(record, dict):
            return record
    return {}


def _written_by_live_holder(record: dict) -> bool:
    """False for an empty record or one left by a dead process on this host (the new holder has taken the
    lock but not yet replaced the record)."""
    if not record:
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        pass
    return True


def holder_record(path: Path, wait_seconds: float = 2.0) -> dict:
    """The record of the process that holds the lock file `path`, waiting up to `wait_seconds` for it: a
    process writes its record just after taking the lock, so one that has just won a race has not yet."""
    deadline = time.monotonic() + wait_seconds
    while True:
        record = read_record(path)
        if _written_by_live_holder(record) or time.monotonic() >= deadline:
            return record
        time.sleep(0.05)


def holder(path: Path) -> dict | None:
    """The record of the live process holding the lock file `path` (this one included), or None when no
    process holds it (never taken, released, or its holder died: the kernel let it go)."""
    key = _key(path)
    if key in _held:
        return read_record(key)
    try:
        descriptor = os.open(key, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder_record(key)
    finally:
        os.close(descriptor)  # releases the probe's shared lock at once
    return None


def describe(record: dict) -> str:
    """`pid N on HOST since T`, from a holder's record."""
    if not record:
        return "another process"  # it has not written its record yet
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} since {record.get('started', '?')}"


@contextlib.contextmanager
def folder_writer(folder: Path) -> Iterator[None]:
    """Hold `folder` for writing: a second process asking for it gets a one-line UserError naming the pid
    and host of the one writing, instead of both writing the same files."""
    lock = FileLock(Path(folder) / WRITER_LOCK)
    if not lock.acquire(blocking=False):
        raise UserError(f"{folder} is being written by {describe(holder_record(lock.path))}; "
                        f"wait for it or choose another folder")
    try:
        yield
    finally:
        lock.release()
