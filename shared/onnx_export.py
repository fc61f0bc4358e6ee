"""ONNX files, for the runtimes that read ONNX rather than TensorFlow: a Keras model converted by Keras' own
exporter (`model.export(format="onnx")`, which uses tf2onnx with the TensorFlow backend), with what a reader needs
to feed it (the preprocessing, the class names) in the file's metadata. An optional extra: `pip install -e
'.[onnx]'`.

    path = export_onnx(model, run.path / "export" / "model.onnx", {"preprocessing": json.dumps(...)})

The file is written under a temporary name and renamed when complete and checked: an op the converter cannot take
is a one-line error naming it (tf2onnx itself only logs it and writes a file no runtime loads).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np

from shared import durable
from shared.errors import UserError

INSTALL = "pip install -e '.[onnx]' (tf2onnx, onnx, onnxruntime)"


def check_installed() -> None:
    """A UserError naming the extra when the converter is not installed (before any model is rebuilt)."""
    missing = [name for name in ("tf2onnx", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}: {INSTALL}")


def export_onnx(model, out: Path, metadata: dict[str, str]) -> Path:
    """`model` (a Keras model of one image input) as the ONNX file `out`, with `metadata` (string keys and
    values) in its metadata_props; returns `out`."""
    onnx = _onnx()
    if not getattr(model, "_called", False):  # Keras exports only a model that has run once
        shape = [1 if size is None else size for size in model.inputs[0].shape]
        model(np.zeros(shape, np.float32), training=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with durable.partial_path(out) as partial, _converter_quiet():
        model.export(str(partial), format="onnx", verbose=False)
        converted = onnx.load(str(partial))
        unknown = sorted({node.op_type for node in converted.graph.node
                          if not onnx.defs.has(node.op_type, node.domain or "")})
        if unknown:
            more = f" (and {', '.join(unknown[1:])})" if unknown[1:] else ""
            raise UserError(f"ONNX export: the converter cannot take TensorFlow op {unknown[0]}{more}; leave that "
                            f"layer out of the model, or export --format saved_model or tflite")
        for key, value in metadata.items():
            entry = converted.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(converted, str(partial))
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file."""
    onnx = _onnx()
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


def _onnx():
    """The onnx package, or a UserError naming the extra (tf2onnx too: Keras' exporter imports it)."""
    check_installed()
    try:
        import onnx
    except ImportError as error:  # present but broken (a version another package pinned)
        raise UserError(f"ONNX export could not import onnx ({error}): {INSTALL}") from None
    return onnx


@contextlib.contextmanager
def _converter_quiet():
    """tf2onnx logs every op it cannot take and much else; what matters is said in one line instead."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():  # Keras' tf2onnx shim probes np.object, which NumPy warns about
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)
