"""Progress output that suits where it goes: bars only on a terminal (a log or CI gets no carriage returns and no
escape codes), and no colour when NO_COLOR is set (https://no-color.org).

What the libraries do on their own: tqdm draws no colour unless asked, and `disable=None` is its own "only on a
terminal" switch; Keras' fit bar (verbose=1) is always coloured (bold, green, grey escape codes), its verbose=2 is
one plain line per epoch; Optuna's log lines go through colorlog, which already drops colour off a terminal or
under NO_COLOR.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def no_color() -> bool:
    """NO_COLOR present and not empty (the no-color.org rule)."""
    return bool(os.environ.get("NO_COLOR"))


def progress_bar(iterable: Iterable | None = None, **kwargs):
    """tqdm(iterable, **kwargs), drawn only when its stream (stderr unless `file=`) is a terminal; `disable=True`
    still turns it off anywhere. A `colour` is dropped under NO_COLOR."""
    from tqdm import tqdm

    kwargs["disable"] = True if kwargs.get("disable") else None  # tqdm: None means off on a non-terminal
    if no_color():
        kwargs.pop("colour", None)
    return tqdm(iterable, **kwargs)


def keras_verbosity(configured: int, instead: int = 2) -> int:
    """Keras' `verbose` for fit: its bar (1) only on a terminal without NO_COLOR, since Keras colours the bar
    unconditionally; otherwise `instead` (2: one line per epoch)."""
    if configured == 1 and (no_color() or not sys.stdout.isatty()):
        return instead
    return configured
