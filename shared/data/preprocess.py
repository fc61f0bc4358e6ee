"""The shared preprocessors: decode, match channels, resize / crop, normalize.

All the canonical models share this (the original plan: "all of the models subtract the mean and take
a random 224x224 crop"); the normalization can be toggled off (`data.normalize: false` leaves pixels in
[0, 1]).
"""

from __future__ import annotations

import tensorflow as tf


def decode(path: tf.Tensor, channels: int) -> tf.Tensor:
    """Read and decode one image file (JPEG, PNG, GIF, BMP) to uint8 with `channels` channels."""
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def match_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Grayscale to RGB (or back) so every image has what the model takes."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return tf.image.grayscale_to_rgb(image)
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Plain resize of a square image, skipped when it already has the size."""
    if image.shape[0] == image_size and image.shape[1] == image_size:
        return image
    return tf.image.resize(image, [image_size, image_size])


def resize_and_center_crop(image: tf.Tensor, image_size: int, crop_fraction: float) -> tf.Tensor:
    """Resize the short side to image_size / crop_fraction (256 for 224 at 0.875), keep the aspect
    ratio, take the central image_size square: the standard ImageNet evaluation view."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (image_size / crop_fraction) / tf.reduce_min(shape)
    new_shape = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, new_shape)
    top = (new_shape[0] - image_size) // 2
    left = (new_shape[1] - image_size) // 2
    return tf.slice(image, [top, left, 0], [image_size, image_size, -1])


def normalize(image: tf.Tensor, mean: list[float], std: list[float], enabled: bool) -> tf.Tensor:
    """(x - mean) / std per channel on the 0-255 scale, or x / 255 when normalization is off."""
    if not enabled:
        return image / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
