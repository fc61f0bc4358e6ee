"""Keras' model saving, made to cache what it means to cache.

Every `.keras` save and every weight load walks the model's objects, and for each it skips the attributes a plain
object of its kind has (`keras.src.saving.saving_lib.get_attr_skipset`). Keras means to work those sets out once
per kind and keep them, but it stores each under `saving_attr_skipset_<kind>` and looks it up under
`saving_attr_skiplist_<kind>` (Keras 3.15), so it never finds one: every layer of every checkpoint makes a fresh
reference `Layer()` and lists its attributes again. `install` keeps each kind's set once per process, where that
lookup misses; a Keras that finds its own stored sets is left as it is. The sets depend only on Keras' classes, so
one per kind is what Keras intends. scripts/bench_checkpoint.py measures a save and a load with and without it
(Keras' own function is the installed one's `__wrapped__`).
"""

from __future__ import annotations

import functools


def install() -> None:
    """Keep Keras' attribute skip sets once per kind of object, if Keras does not find the ones it stored."""
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    skipset = saving_lib.get_attr_skipset
    if hasattr(skipset, "cache_info"):  # installed already
        return
    skipset("Layer")
    if global_state.get_global_attribute("saving_attr_skiplist_Layer") is not None:  # Keras finds its own
        return
    saving_lib.get_attr_skipset = functools.cache(skipset)

