"""Readable class names: the 1000 ImageNet wnids (n01440764 ...) as words ("tench" ...), offline.

The names ship with the package in `shared/data/imagenet_class_names.tsv` (wnid<TAB>name, Keras Applications'
sorted-wnid order; its header line says where they come from), so plots, predictions and exports show names
without Keras' download of imagenet_class_index.json. Deliberately TensorFlow-free and cheap to import.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

NAMES_FILE = ("data", "imagenet_class_names.tsv")  # inside the `shared` package
WNID = re.compile(r"n\d{8}")


@functools.lru_cache(maxsize=None)
def _names() -> tuple[tuple[str, str], ...]:
    path = resources.files("shared").joinpath(*NAMES_FILE)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            wnid, name = line.split("\t")
            rows.append((wnid, name))
    return tuple(rows)


def imagenet_names() -> dict[str, str]:
    """wnid -> readable name for the 1000 ILSVRC2012 classes, in Keras Applications' (sorted-wnid) order."""
    return dict(_names())


def readable(names: list[str]) -> list[str]:
    """Each ImageNet wnid replaced by its readable name; any other name (Fashion-MNIST's, a folder's, a wnid
    outside the 1000) unchanged."""
    table = imagenet_names()
    return [table.get(name, name) if WNID.fullmatch(name) else name for name in names]
