"""How well a restorer deblurs: PSNR and SSIM (TensorFlow's `tf.image.psnr` / `tf.image.ssim` on 0-255
pixels, max_val 255, restored images clipped to 0-255 as a viewer shows them) of the blurred input and of
the restored output against the sharp image; the figure deblur.png; and the use that matters, a
classifier's top-1 on sharp, blurred and restored test images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from shared import plots
from shared.config_schema import Config
from shared.deblur.data import pixel_mapping
from shared.errors import UserError

FIGURE_FILE = "deblur.png"
GALLERY_CELL = 1.4  # inches per image in deblur.png
SSIM_FILTER = 11  # tf.image.ssim's default Gaussian window, narrowed for images smaller than it


def psnr(sharp_pixels: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
    """Per-image PSNR in dB of `pixels` (clipped to 0-255) against `sharp_pixels`, both on 0-255."""
    return tf.image.psnr(sharp_pixels, tf.clip_by_value(pixels, 0.0, 255.0), max_val=255.0)


def ssim(sharp_pixels: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
    """Per-image SSIM of `pixels` (clipped to 0-255) against `sharp_pixels`, both on 0-255."""
    size = min(SSIM_FILTER, int(sharp_pixels.shape[1]), int(sharp_pixels.shape[2]))
    return tf.image.ssim(sharp_pixels, tf.clip_by_value(pixels, 0.0, 255.0), max_val=255.0, filter_size=size)


def psnr_metric(config: Config):
    """A Keras metric function (sharp, restored) on normalized images -> per-image PSNR, named "psnr"."""
    to_pixels, _ = pixel_mapping(config)

    def psnr_fn(y_true, y_pred):
        return psnr(to_pixels(tf.cast(y_true, tf.float32)), to_pixels(tf.cast(y_pred, tf.float32)))
    psnr_fn.__name__ = "psnr"
    return psnr_fn


def keras_restore(model: keras.Model) -> Callable:
    """A restorer model as a function normalized blurred images -> normalized restored images."""
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def evaluate_restorer(restore: keras.Model | Callable, test: tf.data.Dataset, config: Config) -> tuple[dict, dict]:
    """Mean PSNR / SSIM of the blurred and the restored test images (`test` yields (blurred, sharp,
    labels), normalized; `restore` a restorer model, or any function images -> restored images, e.g. a
    TFLite interpreter's); returns (metrics, gallery of the first deblur.gallery images as 0-255 pixels)."""
    to_pixels, _ = pixel_mapping(config)
    forward = keras_restore(restore) if isinstance(restore, keras.Model) else restore
    sums = {"psnr_blurred": 0.0, "psnr_restored": 0.0, "ssim_blurred": 0.0, "ssim_restored": 0.0}
    count, shown = 0, {"blurred": [], "restored": [], "sharp": []}
    for blurred, sharp, _ in test:
        restored = tf.cast(forward(blurred), tf.float32)
        sharp_px, blurred_px, restored_px = (tf.clip_by_value(to_pixels(x), 0.0, 255.0)
                                             for x in (sharp, blurred, restored))
        for name, pixels in (("blurred", blurred_px), ("restored", restored_px)):
            sums[f"psnr_{name}"] += float(tf.reduce_sum(psnr(sharp_px, pixels)))
            sums[f"ssim_{name}"] += float(tf.reduce_sum(ssim(sharp_px, pixels)))
        count += int(sharp.shape[0])
        missing = config.deblur.gallery - sum(len(x) for x in shown["sharp"])
        if missing > 0:
            for name, pixels in (("blurred", blurred_px), ("restored", restored_px), ("sharp", sharp_px)):
                shown[name].append(pixels.numpy()[:missing])
    if count == 0:
        raise UserError("the test split is empty; check data.test_split and data.limit_test")
    metrics = {key: value / count for key, value in sums.items()}
    metrics["psnr_gain"] = metrics["psnr_restored"] - metrics["psnr_blurred"]
    metrics["examples"] = count
    return metrics, {name: np.concatenate(parts) for name, parts in shown.items()}


def summary(metrics: dict) -> str:
    line = (f"test PSNR {metrics['psnr_blurred']:.2f} -> {metrics['psnr_restored']:.2f} dB "
            f"({metrics['psnr_gain']:+.2f})  SSIM {metrics['ssim_blurred']:.4f} -> {metrics['ssim_restored']:.4f}  "
            f"({metrics['examples']} images)")
    if "classifier" in metrics:
        c = metrics["classifier"]
        line += (f"; classifier top-1 sharp {c['top1_sharp']:.4f} blurred {c['top1_blurred']:.4f} "
                 f"restored {c['top1_restored']:.4f}")
    return line


def gallery_figure(gallery: dict) -> Figure:
    """One column per test image, rows blurred / restored / sharp, each titled with its row and (blurred,
    restored) its PSNR against the sharp image; one picture (`plots.montage_figure`)."""
    count = len(gallery["sharp"])
    images, titles = [], []
    for name in ("blurred", "restored", "sharp"):
        for column in range(count):
            image = gallery[name][column]
            images.append(np.clip(image, 0, 255) / 255.0)
            value = "" if name == "sharp" else \
                f" {float(psnr(gallery['sharp'][column][None], image[None])[0]):.1f} dB"
            titles.append(f"{name}{value}")
    layout = plots.grid_layout(len(images), count, GALLERY_CELL, title_inches=0.25)
    return plots.montage_figure(layout, images, titles, title_size=8)


def plot_gallery(gallery: dict, out_png: Path) -> Path:
    """deblur.png: `gallery_figure` written to `out_png`."""
    return plots.save_figure(gallery_figure(gallery), out_png)


# ---------------------------------------------------------------- what a classifier makes of it


def check_classifier(classifier_config: Config, config: Config, classifier_names: list[str] | None,
                     class_names: list[str], where: str) -> None:
    """The classifier must take the restorer's images (size, channels) and name the same classes."""
    if classifier_config.task != "classification":
        raise UserError(f"{where} is a {classifier_config.task} run; --classifier needs a classification run")
    theirs, ours = classifier_config.data, config.data
    if (theirs.image_size, theirs.channels) != (ours.image_size, ours.channels):
        raise UserError(f"{where} takes {theirs.image_size} px images of {theirs.channels} channel(s), the "
                        f"deblurring run {ours.image_size} px of {ours.channels}; use a classifier trained on "
                        f"the same image size and channels")
    if classifier_names and list(classifier_names) != list(class_names):
        first = next((i for i, (a, b) in enumerate(zip(classifier_names, class_names)) if a != b),
                     min(len(classifier_names), len(class_names)))
        raise UserError(f"{where} names {len(classifier_names)} classes, the test data {len(class_names)}, "
                        f"first difference at index {first}; use a classifier of the same data")


def classifier_top1(classifier: keras.Model, classifier_config: Config, restorer: keras.Model,
                    test: tf.data.Dataset, config: Config) -> dict:
    """The classifier's top-1 on the sharp, blurred and restored test images (`test` yields (blurred,
    sharp, labels) normalized as `config` says; each goes through 0-255 pixels into the classifier's own
    normalization), and `recovered`: the share of the top-1 lost to blur that restoring wins back."""
    to_pixels, _ = pixel_mapping(config)
    _, classifier_input = pixel_mapping(classifier_config)
    classify = tf.function(lambda images: classifier(images, training=False), reduce_retracing=True)
    restore = keras_restore(restorer)
    hits, count = {"sharp": 0, "blurred": 0, "restored": 0}, 0
    for blurred, sharp, labels in test:
        restored = tf.cast(restore(blurred), tf.float32)
        for name, images in (("sharp", sharp), ("blurred", blurred), ("restored", restored)):
            pixels = tf.clip_by_value(to_pixels(images), 0.0, 255.0)
            predicted = tf.argmax(classify(classifier_input(pixels)), axis=-1, output_type=tf.int64)
            hits[name] += int(tf.reduce_sum(tf.cast(predicted == tf.cast(labels, tf.int64), tf.int32)))
        count += int(labels.shape[0])
    if count == 0:
        raise UserError("the test split is empty; check data.test_split and data.limit_test")
    top1 = {f"top1_{name}": value / count for name, value in hits.items()}
    lost = top1["top1_sharp"] - top1["top1_blurred"]
    recovered = (top1["top1_restored"] - top1["top1_blurred"]) / lost if lost > 0 else None
    return {**top1, "recovered": recovered, "examples": count}
