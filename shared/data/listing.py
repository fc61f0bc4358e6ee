"""Image files on disk, as the folder and ILSVRC sources list them: which names count as images, and
the one fixed shuffle that mixes the classes of a sorted listing."""

from __future__ import annotations

import os
import random

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not os.path.basename(name).startswith(".")


def mix_classes(files: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Shuffle a class-sorted listing once with a fixed seed: the order is the same on every run, and a
    validation carve-out (data.val_fraction) from its head holds every class."""
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    return [files[i] for i in order], [labels[i] for i in order]
