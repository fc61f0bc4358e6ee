"""Checks inside `tf.data` maps whose failure reaches the user as one line. A graph cannot raise UserError:
the check fails its op (an InvalidArgumentError wherever the pipeline is read: fit, evaluation) with the
message between shared.errors' marks, which `run_cli` prints alone (`shared.errors.embedded_user_error`)."""

from __future__ import annotations

import tensorflow as tf

from shared.errors import EMBED_END, EMBED_START


def check(condition: tf.Tensor, *parts: str | tf.Tensor) -> tf.Operation:
    """An op that fails when `condition` is false, with the message `parts` joined (strings, or tensors
    written as text). Make the map's output depend on it (`tf.control_dependencies`)."""
    text = [part if isinstance(part, str) or part.dtype == tf.string else tf.strings.as_string(part)
            for part in parts]
    return tf.debugging.Assert(condition, [tf.strings.join([EMBED_START, *text, EMBED_END])])
