"""Image files on disk, as the folder and ILSVRC sources list them: which names count as images, and
the one fixed shuffle that mixes the classes of a sorted listing."""

from __future__ import annotations

import os
import random
import stat
import unicodedata
from pathlib import Path

from shared.errors import UserError

# The formats that are read (shared.data.formats.FORMATS); a file's content, not its name, decides how it decodes.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".webp"}
# Images in formats that are not read: listed like the others, so each is refused in one line naming it
# (data.on_corrupt: error) or skipped and named (skip), never left out without a word.
REFUSED_SUFFIXES = {".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".ico", ".svg", ".psd", ".dng", ".cr2",
                    ".nef", ".arw", ".raw"}
# The first bytes of the formats that are read, for files whose name has no extension at all.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"RIFF")


def is_image(name: str) -> bool:
    """Whether a file's name says it is an image (read or refused): not hidden, an image extension."""
    suffix = os.path.splitext(name)[1].lower()
    return (suffix in IMAGE_SUFFIXES or suffix in REFUSED_SUFFIXES) and not os.path.basename(name).startswith(".")


def is_image_file(path: str | os.PathLike) -> bool:
    """`is_image` by name; a name without any extension by its first bytes (a read format's signature)."""
    name = os.path.basename(os.fspath(path))
    if is_image(name):
        return True
    if name.startswith(".") or os.path.splitext(name)[1]:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    return any(head.startswith(signature) for signature in SIGNATURES) and (not head.startswith(b"RIFF")
                                                                            or head[8:12] == b"WEBP")


def refused_by_name(files: list[str]) -> list[str]:
    """The files whose extension names a format that is not read (HEIC, TIFF, ...)."""
    return [path for path in files if os.path.splitext(path)[1].lower() in REFUSED_SUFFIXES]


def mix_classes(files: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Shuffle a class-sorted listing once with a fixed seed: the order is the same on every run, and a
    validation carve-out (data.val_fraction) from its head holds every class."""
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    return [files[i] for i in order], [labels[i] for i in order]


def class_name(folder: Path) -> str:
    """A class folder's name as text. The name lands in labels.txt and exported models, so it must be
    UTF-8; image file names need not be (they are read as bytes, see `file_names`)."""
    try:
        name = os.fsencode(folder.name).decode("utf-8")
    except UnicodeError:
        raise UserError(f"class folder {ascii(str(folder))} is not named in UTF-8; rename it "
                        f"(its name becomes a class label)") from None
    if any(unicodedata.category(c) == "Cc" for c in name):  # labels.txt holds one name per line
        raise UserError(f"class folder {str(folder)!r} has a control character (a newline, a tab) in its name; "
                        f"rename it (its name becomes a class label)")
    return name


def file_names(files: list[str]) -> list[bytes]:
    """Paths as the bytes the file system holds, so a name that is not valid UTF-8 is read too."""
    return [os.fsencode(path) for path in files]


class UnreadableFile(ValueError):
    """Why an image file is not read, worded to follow its name ("is a FIFO, not a regular file")."""


def read_image_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """An image file's bytes: only a regular file (a FIFO would block the reader, a device never end) of at
    most `max_bytes` (data.max_image_bytes); UnreadableFile says why not."""
    try:  # non-blocking: opening a FIFO waits for a writer otherwise
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise UnreadableFile(f"cannot be read ({error.strerror or error})") from None
    try:
        facts = os.fstat(handle)
        if not stat.S_ISREG(facts.st_mode):
            kind = "a folder" if stat.S_ISDIR(facts.st_mode) else "a FIFO" if stat.S_ISFIFO(facts.st_mode) \
                else "a device" if stat.S_ISCHR(facts.st_mode) or stat.S_ISBLK(facts.st_mode) else "a socket"
            raise UnreadableFile(f"is {kind}, not a regular file")
        if facts.st_size > max_bytes:
            raise UnreadableFile(f"is {facts.st_size} bytes, above data.max_image_bytes {max_bytes}")
        with os.fdopen(os.dup(handle), "rb") as stream:
            data = stream.read(max_bytes + 1)  # a file that grew since: still no more than the limit
    except OSError as error:
        raise UnreadableFile(f"cannot be read ({error.strerror or error})") from None
    finally:
        os.close(handle)
    if len(data) > max_bytes:
        raise UnreadableFile(f"is above data.max_image_bytes {max_bytes} bytes")
    return data
