"""Blur generators: the degradations a deblurring run (task: deblur) learns to undo, composed from the
YAML list `deblur.blur` with the augmentation-generator machinery of `shared.data.augment` (an entry is a
name or `{name: {argument: value}}`; arguments are checked against the generator's signature).

A generator returns a function (images [B, H, W, C] float32 on the 0-255 scale, batch index) -> images
of the same shape. Randomness is stateless (TF's `stateless_*` ops keyed by the generator's own seed and
the batch index), so the same batch index blurs the same way every time: the test split's
blurred images are the same at training time, at `test --run` and in a benchmark.

Blur is one depthwise convolution per batch with a kernel generated per image (the batch is folded into
the channel axis), on reflect-padded images: a kernel summing to 1 keeps the mean brightness and the
borders show no dark frame.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Callable

import tensorflow as tf

from shared.data import augment
from shared.errors import UserError

BlurFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (images, batch index) -> images


def _key(seed: int, index: tf.Tensor, draw: int) -> tf.Tensor:
    """The stateless key of one draw (`draw` tells a generator's draws apart) for batch `index`."""
    return tf.stack([tf.constant(seed * 16 + draw, tf.int64), tf.cast(index, tf.int64)])


def _uniform(seed: int, index: tf.Tensor, draw: int, count: tf.Tensor, bounds) -> tf.Tensor:
    """`count` values uniform in [low, high] (a number is a fixed value)."""
    low, high = _bounds(bounds)
    if high == low:
        return tf.fill([count], low)
    return tf.random.stateless_uniform([count], _key(seed, index, draw), minval=low, maxval=high)


def _bounds(bounds) -> tuple[float, float]:
    if isinstance(bounds, (int, float)):
        return float(bounds), float(bounds)
    if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and bounds[0] <= bounds[1]:
        return float(bounds[0]), float(bounds[1])
    raise ValueError(f"a range is a number or [low, high] with low <= high, got {bounds!r}")


def _offsets(size: int) -> tf.Tensor:
    """Pixel offsets -r..r of a kernel of odd `size`, as float32."""
    radius = size // 2
    return tf.range(-radius, radius + 1, dtype=tf.float32)


def _normalized(kernels: tf.Tensor) -> tf.Tensor:
    return kernels / tf.reduce_sum(kernels, axis=[1, 2], keepdims=True)


def apply_kernels(images: tf.Tensor, kernels: tf.Tensor) -> tf.Tensor:
    """Each image [B, H, W, C] convolved with its own kernel [B, K, K] (K odd), every channel alike:
    one depthwise convolution over the batch folded into channels, on reflect padding."""
    size = kernels.shape[-1]
    pad = size // 2
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    batch = tf.shape(images)[0]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    folded = tf.reshape(tf.transpose(padded, [1, 2, 0, 3]), [1, height + 2 * pad, width + 2 * pad, -1])
    # Channel b * C + c of the folded image is channel c of image b: its kernel is image b's.
    filters = tf.transpose(tf.repeat(kernels, channels, axis=0), [1, 2, 0])[..., None]
    blurred = tf.nn.depthwise_conv2d(folded, filters, strides=[1, 1, 1, 1], padding="VALID")
    return tf.transpose(tf.reshape(blurred, [height, width, batch, channels]), [2, 0, 1, 3])


def gaussian_kernels(sigmas: tf.Tensor, size: int) -> tf.Tensor:
    """Isotropic Gaussian kernels [B, size, size], one per sigma, summing to 1."""
    x = _offsets(size)
    one_d = tf.exp(-tf.square(x)[None, :] / (2.0 * tf.square(sigmas)[:, None]))
    return _normalized(one_d[:, :, None] * one_d[:, None, :])


def box_kernels(sides: tf.Tensor, size: int) -> tf.Tensor:
    """Box kernels [B, size, size]: a centred square of odd side `sides[b]` (<= size) of equal weights."""
    x = tf.abs(_offsets(size))
    inside = tf.cast(x[None, :] <= tf.cast(sides // 2, tf.float32)[:, None], tf.float32)
    return _normalized(inside[:, :, None] * inside[:, None, :])


def motion_kernels(lengths: tf.Tensor, angles: tf.Tensor, size: int) -> tf.Tensor:
    """Linear motion kernels [B, size, size]: a centred line segment of `lengths` px at `angles` degrees
    (counter-clockwise from the x axis), drawn anti-aliased (weight 1 - distance from the line, within
    half the length along it), summing to 1. Point-symmetric, so correlation equals convolution."""
    x = _offsets(size)
    xs, ys = x[None, None, :], -x[None, :, None]  # rows go down, angles go up
    radians = angles[:, None, None] * (math.pi / 180.0)
    along = xs * tf.cos(radians) + ys * tf.sin(radians)
    across = -xs * tf.sin(radians) + ys * tf.cos(radians)
    half = lengths[:, None, None] / 2.0
    weight = tf.nn.relu(1.0 - tf.abs(across)) * tf.clip_by_value(half + 0.5 - tf.abs(along), 0.0, 1.0)
    return _normalized(weight)


def _odd_size(radius: float) -> int:
    return 2 * int(math.ceil(radius)) + 1


def _check_fits(size: int, image_size: int, what: str) -> None:
    """Reflect padding by half the kernel needs that many pixels inside the image."""
    if image_size and size // 2 >= image_size:
        raise ValueError(f"{what} needs a {size} px kernel, too wide for {image_size} px images; make it smaller")


def gaussian(sigma=(1.0, 2.0), image_size: int = 0, seed: int = 0) -> BlurFn:
    """Gaussian blur of standard deviation uniform in `sigma` [low, high] px (or fixed), per image; the
    kernel covers 3 sigma of the largest."""
    low, high = _bounds(sigma)
    if low <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    size = _odd_size(3 * high)
    _check_fits(size, image_size, f"sigma {high:g}")

    def blur(images, index):
        sigmas = _uniform(seed, index, 0, tf.shape(images)[0], (low, high))
        return apply_kernels(images, gaussian_kernels(sigmas, size))
    return blur


def box(size=(3, 5), image_size: int = 0, seed: int = 0) -> BlurFn:
    """Box (mean) blur of an odd side drawn uniformly from the odd numbers in `size` [low, high] (or
    fixed), per image."""
    low, high = (int(v) for v in _bounds(size))
    if low < 1 or low % 2 == 0 or high % 2 == 0:
        raise ValueError(f"size must be odd and >= 1, got {size!r}")
    _check_fits(high, image_size, f"size {high}")

    def blur(images, index):
        halves = tf.random.stateless_uniform([tf.shape(images)[0]], _key(seed, index, 0), minval=low // 2,
                                             maxval=high // 2 + 1, dtype=tf.int32)
        return apply_kernels(images, box_kernels(2 * halves + 1, high))
    return blur


def motion(length=(3.0, 9.0), angle=(0.0, 180.0), image_size: int = 0, seed: int = 0) -> BlurFn:
    """Linear motion blur: a straight streak `length` px long [low, high] at `angle` degrees [low, high],
    both uniform per image."""
    low, high = _bounds(length)
    if low < 1:
        raise ValueError(f"length must be >= 1, got {length!r}")
    _bounds(angle)
    size = _odd_size(high / 2)
    _check_fits(size, image_size, f"length {high:g}")

    def blur(images, index):
        count = tf.shape(images)[0]
        lengths = _uniform(seed, index, 0, count, (low, high))
        angles = _uniform(seed, index, 1, count, angle)
        return apply_kernels(images, motion_kernels(lengths, angles, size))
    return blur


def noise(stddev=(0.0, 5.0), image_size: int = 0, seed: int = 0) -> BlurFn:
    """Additive Gaussian noise of standard deviation uniform in `stddev` [low, high] (0-255 scale), per
    image, clipped to 0-255."""
    low, high = _bounds(stddev)
    if low < 0:
        raise ValueError(f"stddev must be >= 0, got {stddev!r}")

    def add(images, index):
        scales = _uniform(seed, index, 0, tf.shape(images)[0], (low, high))
        values = tf.random.stateless_normal(tf.shape(images), _key(seed, index, 1)) * scales[:, None, None, None]
        return tf.clip_by_value(images + values, 0.0, 255.0)
    return add


GENERATORS = {f.__name__: f for f in (gaussian, box, motion, noise)}


def build(entries: list, image_size: int = 0, seed: int = 0) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The composed degradation of `deblur.blur` (applied in the listed order): a function (images
    [B, H, W, C] on 0-255, batch index) -> degraded images, clipped to 0-255. `image_size` (when given):
    kernels wider than the images allow are refused. Names are checked here (only
    the generators above: a crop or flip would no longer pair with the sharp image); arguments by the
    augmentation machinery."""
    if not entries:
        raise UserError(f"deblur.blur is empty; list at least one of {', '.join(GENERATORS)}, "
                        f"e.g. [{{gaussian: {{sigma: [1.0, 2.0]}}}}]")
    this_module = ModuleType("blur_generators")
    vars(this_module).update(GENERATORS)
    built = augment.build(entries, image_size, this_module, seed=seed, key="deblur.blur")
    for augmentation in built:  # the machinery also knows crops, flips and Keras layers
        if augmentation.name not in GENERATORS:
            raise UserError(f"deblur.blur {augmentation.name!r} is not a blur generator; choose from "
                            f"{', '.join(GENERATORS)}")
    functions = [augmentation.fn for augmentation in built]

    def degrade(images: tf.Tensor, index) -> tf.Tensor:
        for fn in functions:  # augment.build gave each its own seed (seed + position)
            images = fn(images, index)
        return tf.clip_by_value(images, 0.0, 255.0)
    return degrade
