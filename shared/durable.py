"""Crash-consistent writes: every file that matters is written under a temporary name beside its target,
flushed and fsynced, renamed over the target, and the folder is fsynced, so a kill or power loss at any
moment leaves either the old file or the new one, never half of one. A full disk becomes one line naming
the path and the free space (a `DiskFull`, which is a `UserError`), with the partial file removed.

    atomic_write(path, text_or_bytes)        small files: status, config, metrics, labels, TFLite models
    with partial_path(final) as partial:     a writer that wants a path (model.save, savefig, TFRecordWriter)
        model.save(partial)
    publish(partial, final)                  a finished file or folder: fsync it, rename, fsync the parent
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from shared.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """No space left (or quota exceeded) while writing a file."""


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged writer on the file system holding `path` (or its nearest folder)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(count: int | None) -> str:
    if count is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count}"


def disk_full_error(path: Path) -> DiskFull:
    path = Path(path)
    return DiskFull(f"disk full while writing {path} ({_size(free_bytes(path.parent))} free there); "
                    f"free some space (scripts/prune_checkpoints.sh removes old checkpoints) and run again")


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, whether raised by Python or reported by TensorFlow/h5py as text."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def disk_space_checked(path: Path) -> Iterator[None]:
    """Turn a full-disk error while writing `path` into a one-line DiskFull naming it."""
    try:
        yield
    except DiskFull:
        raise
    except BaseException as error:
        if is_disk_full(error):
            raise disk_full_error(path) from None
        raise


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    with contextlib.suppress(OSError):  # some file systems cannot open or fsync a directory
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder below a folder (a SavedModel)."""
    path = Path(path)
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                fsync_tree(Path(folder) / name)
            fsync_dir(Path(folder))
        return
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def partial_name(final: Path) -> Path:
    """A fresh hidden name beside `final` (same folder, so the rename is atomic). The suffix keeps
    the final name's extensions last, because Keras picks the format from them (`.keras`, `.weights.h5`)."""
    final = Path(final)
    return final.with_name(f".partial-{uuid.uuid4().hex[:12]}-{final.name}")


def publish(partial: Path, final: Path) -> Path:
    """Make a finished file or folder durable and rename it over `final`, then fsync the folder."""
    partial, final = Path(partial), Path(final)
    with disk_space_checked(final):
        fsync_tree(partial)
        os.replace(partial, final)
        fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def partial_path(final: Path) -> Iterator[Path]:
    """A temporary path beside `final` for a writer that wants a path; published as `final` when the
    block ends normally, removed (file or folder) when it raises. A full disk is a DiskFull."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(final)
    try:
        with disk_space_checked(final):
            yield partial
        publish(partial, final)
    finally:
        remove(partial)


def remove(path: Path) -> None:
    """Remove a file or folder if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write `content` (UTF-8 text or bytes) to `path` crash-consistently, with the usual permissions."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    with partial_path(path) as partial:
        handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
        with os.fdopen(handle, "wb") as out:
            out.write(data)
