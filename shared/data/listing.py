"""Image files on disk, as the folder and ILSVRC sources list them: which names count as images, and
the one fixed shuffle that mixes the classes of a sorted listing."""

from __future__ import annotations

import os
import random
import unicodedata
from pathlib import Path

from shared.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not os.path.basename(name).startswith(".")


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
