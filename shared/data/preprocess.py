"""The shared preprocessors: decode (`shared.data.formats`), resize / crop, normalize.

All the canonical models share this (the original plan: "all of the models subtract the mean and take
a random 224x224 crop"); the normalization can be toggled off (`data.normalize: false` leaves pixels in
[0, 1]).
"""

from __future__ import annotations

import functools

import tensorflow as tf

from shared.data import formats
from shared.data.formats import graph_code


@graph_code
def decode(data: tf.Tensor, channels: int, max_pixels: int | None = None, name: tf.Tensor | str = "") -> tf.Tensor:
    """Decode one encoded image to uint8 with `channels`, as shown (`shared.data.formats`: the one decoder, its
    table of formats; a refused image fails in one line naming `name`)."""
    return formats.decode(data, channels, max_pixels, name)


@graph_code
def decode_and_crop(data: tf.Tensor, window: tuple, channels: int, max_pixels: int | None = None,
                    name: tf.Tensor | str = "") -> tf.Tensor:
    """Decode only the crop window [top, left, height, width] of the shown image: for a JPEG,
    `decode_and_crop_jpeg` skips the blocks outside it (the main saving of the ImageNet input pipeline); other
    formats decode whole, then crop."""
    return formats.decode_crop(data, channels, lambda shown: tf.stack(window), max_pixels, name)


@graph_code
def encoded_shape(data: tf.Tensor) -> tf.Tensor:
    """[height, width] of an encoded image as shown, read from its header without decoding it."""
    return tf.cast(formats.inspect(data).shown_shape, tf.int32)


@graph_code
def center_crop_window(shape: tf.Tensor, crop_fraction: float) -> tuple:
    """The central square covering `crop_fraction` of the short side: cropping it and resizing to S is
    the standard eval view (resize the short side to S / crop_fraction, take the central S x S)."""
    height, width = tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)
    side = tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * crop_fraction, tf.int32)
    side = tf.maximum(side, 1)
    return (height - side) // 2, (width - side) // 2, side, side


@graph_code
def decode_center_crop(data: tf.Tensor, image_size: int, crop_fraction: float, channels: int,
                       max_pixels: int | None = None, name: tf.Tensor | str = "",
                       dct_scaling: bool = False) -> tf.Tensor:
    """Eval preprocessing of an encoded image: decode only the central crop of the shown image (a JPEG at a DCT
    scale with `dct_scaling`, never below image_size), resize to image_size."""
    cropped = formats.decode_crop(data, channels, lambda shown: tf.stack(center_crop_window(shown, crop_fraction)),
                                  max_pixels, name, target=image_size if dct_scaling else None)
    return tf.image.resize(cropped, [image_size, image_size])


@graph_code
def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Plain resize of a square image, skipped when it already has the size (also when the size is only
    known at run time, as for a decoded file)."""
    if image.shape[0] == image_size and image.shape[1] == image_size:
        return image
    if image.shape[0] is not None and image.shape[1] is not None:
        return tf.image.resize(image, [image_size, image_size])
    shape = tf.shape(image)
    return tf.cond(tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size)),
                   lambda: image, lambda: tf.image.resize(image, [image_size, image_size]))


@graph_code
def center_crop(image: tf.Tensor, image_size: int, crop_fraction: float) -> tf.Tensor:
    """The eval view of decoded pixels: the same central window as `decode_center_crop`, resized."""
    top, left, height, width = center_crop_window(tf.shape(image), crop_fraction)
    cropped = tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))
    return tf.image.resize(cropped, [image_size, image_size])


@graph_code
def eval_view(image: tf.Tensor, image_size: int, crop_fraction: float, channels: int, whole: bool,
              max_pixels: int | None = None, name: tf.Tensor | str = "", dct_scaling: bool = False) -> tf.Tensor:
    """The eval view of one image, as float32 0-255 pixels of (image_size, image_size, channels), not yet
    normalized. `image`: encoded bytes (a tf.string scalar: JPEG, PNG, ...) or decoded pixels (H, W, C).
    `whole`: resize the whole image (sources of fixed-size arrays, seen whole in training) instead of taking
    the central `crop_fraction` square. Encoded images above `max_pixels` (from the header) are refused in one
    line naming `name`; `dct_scaling`: a JPEG's crop decoded at a DCT scale (`decode_center_crop`). The one
    definition of eval preprocessing: the eval pipeline
    (shared.data._image_fn), the SavedModel's serving signature and shared.predict all call it."""
    if image.dtype == tf.string:
        if not whole:  # decode only the central crop (a JPEG skips the blocks outside it)
            return tf.ensure_shape(decode_center_crop(image, image_size, crop_fraction, channels, max_pixels, name,
                                                      dct_scaling), (image_size, image_size, channels))
        image = decode(image, channels, max_pixels, name)
    image = tf.cast(formats.to_channels(image, channels), tf.float32)
    image = resize(image, image_size) if whole else center_crop(image, image_size, crop_fraction)
    return tf.ensure_shape(image, (image_size, image_size, channels))


def normalizer(mean: list[float], std: list[float], enabled: bool, image_size: int):
    """A function image -> (image - mean) / std per channel on the 0-255 scale, or image / 255 when
    normalization is off. The constants are tiled to the full image shape: TF's CPU kernels broadcast a
    3-wide last axis slowly (measured 25-30 % of the whole train pipeline), full-shape operands do not."""
    if not enabled:
        return graph_code(lambda image: image * (1.0 / 255.0))
    shape = [image_size, image_size, 1]
    offset = tf.tile(tf.reshape(tf.constant(mean, tf.float32), [1, 1, -1]), shape)
    scale = tf.tile(tf.reshape(1.0 / tf.constant(std, tf.float32), [1, 1, -1]), shape)
    return graph_code(lambda image: (image - offset) * scale)


# Few: a traced decoder holds thousands of Python objects for as long as it is cached, and every full garbage
# collection walks them all; a process uses one or two views (a loop's, a study's), a test process dozens.
@functools.lru_cache(maxsize=2)
def encoded_eval_view(image_size: int, crop_fraction: float, channels: int, max_pixels: int | None,
                      dct_scaling: bool, whole: bool = False):
    """`eval_view` of an encoded image (a tf.string scalar) and the name a refusal gives it, as one `tf.function`
    per setting: a process that builds many pipelines or exports of one setting (the loop's rounds, a study's
    trials) traces the decoder's graph of every format once, not once a pipeline or a serving signature."""

    @tf.function(autograph=False)
    def view(image: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
        return eval_view(image, image_size, crop_fraction, channels, whole=whole, max_pixels=max_pixels, name=name,
                         dct_scaling=dct_scaling)

    return view
