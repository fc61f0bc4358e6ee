"""TensorFlow Lite conversion of a built model and running the result with LiteRT (batch-1 CPU latency
included); what a task's file takes and returns, and how it is checked, is the task's (its `export.py`).

The converted model takes what the Keras model takes: one *normalized* float32 image of the run's size,
shape (1, image_size, image_size, channels), i.e. (pixel - data.mean) / data.std with the statistics in
the run's config.yaml. Quantization modes:

    none      float32 weights and activations
    float16   weights stored as float16 (dequantized to float32 when the model loads): half the size
    dynamic   dynamic-range quantization: int8 weights, float activations (quantized on the fly)
    int8      full-integer quantization: int8 weights and activations, calibrated on training images;
              builtin int8 kernels only. io="int8" also makes the input and output tensors int8
              (quantize them with the tensor's scale and zero point), io="float" keeps float I/O.

Conversion: a batch-1 `tf.function` of `model(image, training=False)`, its variables frozen into
constants, through `TFLiteConverter.from_concrete_functions`. Freezing first matters with Keras 3 in
TF 2.21: given the unfrozen function (and the model as its trackable object) the converter keeps the
weights as resource variables (VAR_HANDLE / READ_VARIABLE ops) that LiteRT leaves uninitialized (NaN
outputs), and int8 calibration fails on them. `from_keras_model` also works but writes and reloads a
whole SavedModel (3-4x slower); it is the fallback should TF's freezing helper move.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from shared.durable import atomic_write
from shared.errors import UserError
from shared.runs import Run

QUANTIZE_MODES = ("none", "float16", "dynamic", "int8")
IO_TYPES = ("float", "int8")
EXPORT_DIR = "export"
# In a fully-integer model only these ops may touch float tensors (the float I/O boundary).
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


def check_mode(quantize: str, io: str = "float") -> None:
    """Reject an unknown mode or I/O type, and int8 I/O on a model that is not fully int8."""
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if io not in IO_TYPES:
        raise UserError(f"unknown input/output type {io!r}; choose one of {', '.join(IO_TYPES)}")
    if io == "int8" and quantize != "int8":
        raise UserError(f"int8 input/output needs full-integer quantization (quantize=int8), "
                        f"not quantize={quantize}; use io=float with {quantize}")


def default_path(run: Run, quantize: str, io: str = "float") -> Path:
    """`<run>/export/model_<quantize>[_int8io].tflite`."""
    return run.path / EXPORT_DIR / f"model_{quantize}{'_int8io' if io == 'int8' else ''}.tflite"


def frozen_converter(model, input_shape: tuple):
    """A converter for `model(image, training=False)` on one image: static shapes (1, H, W, C)."""
    import tensorflow as tf

    spec = tf.TensorSpec((1, *input_shape), tf.float32, name="image")
    try:  # TF's own freezing helper (what from_keras_model uses inside), not exported under tf.*
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    except ImportError:
        import keras

        inputs = keras.Input(batch_shape=spec.shape, name="image")
        return tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, model(inputs)))
    forward = tf.function(lambda image: model(image, training=False), input_signature=[spec])
    frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
    # The frozen function holds no variables, so its trackable object only has to exist (without one
    # TF takes its deprecated path); passing the model instead re-saves Keras' whole object graph
    # into the converter's temporary SavedModel: 3x slower for the same file.
    return tf.lite.TFLiteConverter.from_concrete_functions([frozen], tf.Module())


def non_int8_ops(content: bytes) -> list[str]:
    """Ops of a converted model that compute in float although it should be fully int8: the converter
    (TF 2.21) silently keeps an op without an int8 kernel (SIN, say) in float between a DEQUANTIZE
    and a QUANTIZE instead of failing, so the result has to be checked."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without the default delegate the op list is the model's own, not XNNPACK's partition of it.
    interpreter = Interpreter(model_content=content,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    if not hasattr(interpreter, "_get_ops_details"):  # no public per-op API in LiteRT 2.3; if it goes,
        boundary = {d["index"] for d in [*interpreter.get_input_details(), *interpreter.get_output_details()]}
        return ["(unnamed)"] if any(t == np.float32 and i not in boundary for i, t in dtypes.items()) else []
    found = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in _BOUNDARY_OPS:
            continue
        tensors = [i for i in [*op["inputs"], *op["outputs"]] if i >= 0]
        if any(dtypes.get(i) == np.float32 for i in tensors):
            found.append(op["op_name"])
    return sorted(set(found))


def convert(model, input_shape: tuple, out_path: Path, quantize: str = "none", io: str = "float",
            representative: Callable[[], Iterator[list[np.ndarray]]] | None = None, source: str = "") -> Path:
    """Convert `model` (one image of `input_shape` in) to a .tflite file written atomically at `out_path`, and
    return that path. `representative`: a generator factory of single normalized images that calibrates the int8
    activation ranges (quantize=int8 needs it); `source`: where the model comes from (its run folder), for
    error messages."""
    check_mode(quantize, io)
    import tensorflow as tf

    converter = frozen_converter(model, tuple(input_shape))
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: weights only
    elif quantize == "int8":
        if representative is None:
            raise ValueError("quantize=int8 needs representative images to calibrate on")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings():
            # Said for every int8 conversion, and means nothing here: the input is float or int8 with
            # the scale calibrated from the representative images.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            content = converter.convert()
    except UserError:
        raise
    except Exception as error:  # ConverterError (not public in tf.lite), or a calibration RuntimeError
        reason = " ".join(str(error).split())[:400]
        hint = "; quantize=dynamic (int8 weights, float activations) or float16 may work" \
            if quantize == "int8" else ""
        raise UserError(f"TFLite conversion (quantize={quantize}) of {source} failed: {reason}{hint}") from error
    if quantize == "int8":
        floating = non_int8_ops(content)
        if floating:
            raise UserError(f"the model of {source} cannot be fully int8-quantized: op(s) {', '.join(floating)} "
                            f"have no int8 kernel and would stay float; use quantize=dynamic (int8 weights, "
                            f"float activations) or float16 instead")
    atomic_write(Path(out_path), content)
    return Path(out_path)


# ---------------------------------------------------------------- running the .tflite


def load_interpreter(path: Path | str, num_threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no TFLite model at {path}; export one first")
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def quantized(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float -> the tensor's integer type with its scale / zero point (float tensors pass through)."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return y.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return (y.astype(np.float32) - zero_point) * scale


def predict_tflite(interpreter, images: np.ndarray) -> np.ndarray:
    """Float probabilities for a batch of normalized float images, one invoke per image (the model
    is batch 1); int8 I/O is quantized / dequantized here."""
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for image in images:
        interpreter.set_tensor(source["index"], quantized(image[None], source))
        interpreter.invoke()
        outputs.append(_dequantize(interpreter.get_tensor(target["index"]), target)[0])
    return np.stack(outputs)


class _Timed:
    """A LiteRT interpreter with a random input in place, ready to be timed."""

    def __init__(self, path: Path | str, num_threads: int = 1):
        self.interpreter = load_interpreter(path, num_threads=num_threads)
        detail = self.interpreter.get_input_details()[0]
        rng = np.random.default_rng(0)
        self.interpreter.set_tensor(detail["index"],
                                    quantized(rng.standard_normal(detail["shape"]).astype(np.float32), detail))

    def sample(self, runs: int) -> list[float]:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append((time.perf_counter() - start) * 1000.0)
        return times


def latency_ms(path: Path | str, runs: int = 50, warmup: int = 5) -> float:
    """Median batch-1 CPU latency (ms) of one invoke with LiteRT (default XNNPACK delegate), on ONE
    thread: a stable figure on a shared machine, and the one that compares across models."""
    timed = _Timed(path)
    timed.sample(warmup)
    return statistics.median(timed.sample(max(1, runs)))


def interleaved_latency_ms(paths: Sequence[Path | str], rounds: int = 5, runs: int = 20,
                           warmup: int = 5) -> list[float]:
    """Median one-thread batch-1 latency of each model, measured in alternating rounds (A, B, A, B...)
    so a load change on a busy machine hits all of them alike, not whichever ran during it."""
    timers = [_Timed(path) for path in paths]
    samples: list[list[float]] = [[] for _ in timers]
    for timed in timers:
        timed.sample(warmup)
    for _ in range(max(1, rounds)):
        for timed, collected in zip(timers, samples):
            collected.extend(timed.sample(max(1, runs)))
    return [statistics.median(collected) for collected in samples]


def keras_latency_ms(model, input_shape: Sequence[int], runs: int = 50, warmup: int = 5) -> float:
    """Median batch-1 latency (ms) of the Keras model as a traced `tf.function` of
    `model(x, training=False)`, result copied to the host. `input_shape` is one image's (H, W, C).
    TensorFlow runs with its own thread pool (all cores unless configured otherwise)."""
    import tensorflow as tf

    shape = tuple(input_shape)
    shape = shape if len(shape) == 4 else (1, *shape)
    forward = tf.function(lambda x: tf.nest.flatten(model(x, training=False)))  # a detector has two outputs
    x = tf.random.normal(shape, seed=0)
    for _ in range(max(1, warmup)):  # the first call traces
        [output.numpy() for output in forward(x)]
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        [output.numpy() for output in forward(x)]
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
