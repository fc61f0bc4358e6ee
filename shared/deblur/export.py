"""Export of a deblurring run: a TF Serving SavedModel (encoded image bytes in, restored image out) and a
TFLite file (one normalized image in, the normalized restored image out), both of the run's model rebuilt from
its own snapshot and last checkpoint (`shared.tasks.rebuild`, by the command), published and written by the
generic layer (shared.export, shared.tflite).

SavedModel endpoints (shared.export.write_archive):
* `serving_default`: image_bytes [N] string -> {"restored": [N, S, S, C] float32 pixels 0-255}; each image
  takes the eval pipeline's view (resized, or the central crop for sources of any size), as classification.
* `predict_images`: images [N, S, S, C] float32 pixels 0-255 -> the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from shared import export, tflite
from shared.data import normalization_statistics, preprocess
from shared.deblur.data import pixel_mapping
from shared.deblur.evaluate import evaluate_restorer
from shared.errors import UserError
from shared.eval_view import resizes_pixels
from shared.runs import Run

OUTPUT = "restored"


def _check_deblur(run: Run, config) -> None:
    if config.task != "deblur":
        raise UserError(f"run {run.path} is a {config.task} run, not a deblurring run (task: deblur)")


def serving_functions(model, config, resize: bool):
    """(bytes_fn, images_fn): encoded images / float pixels 0-255 -> {"restored": pixels 0-255, clipped}."""
    data = config.data
    size, channels = data.image_size, data.channels
    to_pixels, from_pixels = pixel_mapping(config)

    def decode_one(encoded):
        if not resize:
            return preprocess.decode_center_crop(encoded, size, data.crop_fraction, channels, data.max_pixels,
                                                 "an input image")
        image = tf.image.resize(tf.cast(preprocess.decode(encoded, channels, data.max_pixels, "an input image"),
                                        tf.float32), [size, size])
        return tf.ensure_shape(image, (size, size, channels))

    def restore(pixels):
        restored = tf.cast(model(from_pixels(pixels), training=False), tf.float32)
        return {OUTPUT: tf.clip_by_value(to_pixels(restored), 0.0, 255.0)}

    def bytes_fn(image_bytes):
        return restore(tf.map_fn(decode_one, image_bytes,
                                 fn_output_signature=tf.TensorSpec((size, size, channels), tf.float32)))

    return bytes_fn, restore


def export_saved_model(model, config, run: Run, export_dir: str | Path, model_name: str | None = None,
                       version: int | None = None, keep: int = 5) -> Path:
    """The run's restorer `model` (with the run's `config`) as `<export_dir>/<model_name>/<version>/`
    (shared.export's folder rules: version numbering, pruning, models.config, atomic publication); returns that
    path."""
    _check_deblur(run, config)
    model_dir = export.target_folder(run, export_dir, model_name or run.model_name, version, keep)
    data = config.data
    resize = resizes_pixels(config)
    bytes_fn, images_fn = serving_functions(model, config, resize)
    mean, std = normalization_statistics(data) if data.normalize else (None, None)

    def write(staging: Path) -> dict:
        export.write_archive(model, bytes_fn, images_fn, (data.image_size, data.image_size, data.channels), staging)
        return {"task": "deblur", "image_size": data.image_size, "channels": data.channels,
                "preprocessing": "resize" if resize else "center_crop", "crop_fraction": data.crop_fraction,
                "normalize": data.normalize, "mean": mean, "std": std, "output": f"{OUTPUT}: pixels 0-255"}

    return export.publish(run, export_dir, model_dir, version, keep, write)


def convert_tflite(model, config, run: Run, quantize: str = "none", io: str = "float",
                   out_path: Path | None = None) -> Path:
    """The run's restorer `model` (with the run's `config`) as a .tflite file (default
    `<run>/export/restorer_<quantize>.tflite`, written atomically): input one normalized image (1, S, S, C),
    output the normalized restored image."""
    tflite.check_mode(quantize, io)
    if quantize == "int8" or io != "float":
        raise UserError(f"--quantize {quantize} --io {io}: a restorer's TFLite file has float input and output and "
                        f"int8 activations would coarsen the restored pixels; use quantize none, float16 or dynamic")
    _check_deblur(run, config)
    data = config.data
    out = Path(out_path) if out_path is not None else run.path / "export" / f"restorer_{quantize}.tflite"
    return tflite.convert(model, (data.image_size, data.image_size, data.channels), out, quantize, io,
                          source=str(run.path))


def evaluate_tflite(path: Path | str, test, config, limit: int | None = None) -> dict:
    """PSNR / SSIM of the .tflite restorer on the `test` pairs of a run with `config` (`DeblurTask.test_data`),
    the first `limit` test images when given."""
    if limit is not None:
        test = test.unbatch().take(limit).batch(config.train.batch_size)
    interpreter = tflite.load_interpreter(path, num_threads=os.cpu_count())
    metrics, _ = evaluate_restorer(lambda images: tflite.predict_tflite(interpreter, np.asarray(images)), test,
                                   config)
    return metrics
