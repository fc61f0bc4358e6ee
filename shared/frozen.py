"""Deeply immutable values: what a loaded config holds in place of YAML's lists and mappings.

`freeze` turns lists into tuples and mappings into `FrozenMap`s, all the way down, so that no part of the
program can change a value another part holds; `thaw` gives the plain lists and dicts back for writing
(YAML, JSON) and for code that edits a copy. `types.MappingProxyType` is read-only too, but it cannot be
deep-copied or pickled, which configs must be (`copy.deepcopy`, multiprocessing).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class FrozenMap(Mapping):
    """A read-only mapping: item assignment and deletion raise TypeError, attribute assignment AttributeError.
    Equal to any mapping with the same items (a dict included); hashable when its values are."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping | None = None):
        object.__setattr__(self, "_items", dict(items or {}))

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)  # reads as the mapping it was written as, in messages and printed lines

    def __reduce__(self):
        return type(self), (self._items,)  # deepcopy and pickle rebuild it through __init__


def freeze(value: Any) -> Any:
    """`value` with every list (or tuple) a tuple and every mapping a FrozenMap, recursively; anything else
    (numbers, text, None, frozen dataclasses) as it is."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    if isinstance(value, Mapping):
        return FrozenMap({key: freeze(item) for key, item in value.items()})
    return value


def thaw(value: Any) -> Any:
    """A plain copy of a frozen value: tuples as lists, mappings as dicts, recursively (what YAML and JSON
    write, and what code that edits a copy takes)."""
    if isinstance(value, (list, tuple)):
        return [thaw(item) for item in value]
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    return value
