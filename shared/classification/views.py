"""Test-time views: the papers' multi-crop evaluation, softmax averaged over the crops of each image.

    python -m shared.runner test --run runs/alexnet/v0002 --views 10crop

`VIEWS` is the one table. S is data.image_size and R = round(S / data.crop_fraction) (256 for 224 at 0.875):

- `center`: the run's own eval view (the one crop training tested with).
- `flip`: that crop and its horizontal reflection.
- `10crop`: shorter side resized to R; the four corner and the central S x S patches and their reflections
  (Krizhevsky et al. 2012, section 4.1; He et al. 2015, section 3.4 "standard 10-crop testing").
- `multiscale`: the 10 crops at each of the shorter sides R x (1, 1.5, 1.875) (256, 384 and 480 for 224): ResNet's
  multi-scale testing (He et al. 2015, section 3.4) averages a fully convolutional model's scores at shorter sides
  {224, 256, 384, 480, 640}; a model with a fixed input takes crops at each side instead.
- `144crop`: GoogLeNet's protocol (Szegedy et al. 2014, section 7): shorter sides R x (1, 1.125, 1.25, 1.375) (256,
  288, 320, 352 for 224); of each, the left, centre and right (or top, middle, bottom) squares; of each square its
  four corners, its centre S x S and the square resized to S; each and its reflection: 4 x 3 x 6 x 2 = 144.

Images of a fixed-size source (Fashion-MNIST's 28 px arrays, tested whole) are resized the same way: at 28 px,
R = 32, so a 10-crop is the 28 px corners and centre of the image upscaled to 32.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from shared.data import formats, preprocess

# view name -> (crops per image, what the paper calls it)
VIEWS: dict[str, tuple[int, str]] = {
    "center": (1, "the run's eval view: one central crop"),
    "flip": (2, "the central crop and its reflection"),
    "10crop": (10, "4 corners + centre, and their reflections (AlexNet 4.1, ResNet 3.4)"),
    "multiscale": (30, "10 crops at each of 3 shorter sides (ResNet 3.4, with crops for a fixed-input model)"),
    "144crop": (144, "4 scales x 3 squares x 6 crops x 2 reflections (GoogLeNet 7)"),
}
MULTISCALE = (1.0, 1.5, 1.875)
GOOGLENET_SCALES = (1.0, 1.125, 1.25, 1.375)


def five_crop_offsets(height, width, size: int) -> list[tuple]:
    """(top, left) of the four corner and the central `size` x `size` patches of a height x width image, in that
    order: top-left, top-right, bottom-left, bottom-right, centre (Python ints or int32 tensors alike)."""
    bottom, right = height - size, width - size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]


def square_offsets(height, width) -> list[tuple]:
    """(top, left) of GoogLeNet's three squares of side min(height, width): left, centre, right of a wide image
    (top, middle, bottom of a tall one)."""
    side = tf.minimum(height, width) if tf.is_tensor(height) else min(height, width)
    spare_y, spare_x = height - side, width - side
    return [(0, 0), (spare_y // 2, spare_x // 2), (spare_y, spare_x)]


def resize_shorter(image: tf.Tensor, side: int) -> tf.Tensor:
    """`image` (H, W, C float) resized so its shorter side is `side`, the aspect kept."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = side / tf.reduce_min(shape)
    target = tf.maximum(side, tf.cast(tf.round(shape * scale), tf.int32))
    return tf.image.resize(image, target)


def _crop(image: tf.Tensor, top, left, size) -> tf.Tensor:
    return tf.slice(image, tf.stack([top, left, 0]), tf.stack([size, size, -1]))


def _ten(image: tf.Tensor, size: int) -> list[tf.Tensor]:
    shape = tf.shape(image)
    crops = [_crop(image, top, left, size) for top, left in five_crop_offsets(shape[0], shape[1], size)]
    return crops + [tf.image.flip_left_right(crop) for crop in crops]


def _googlenet(image: tf.Tensor, size: int, resize_side: int) -> list[tf.Tensor]:
    crops = []
    for scale in GOOGLENET_SCALES:
        scaled = resize_shorter(image, round(resize_side * scale))
        shape = tf.shape(scaled)
        side = tf.minimum(shape[0], shape[1])
        for top, left in square_offsets(shape[0], shape[1]):
            square = _crop(scaled, top, left, side)
            six = [_crop(square, y, x, size) for y, x in five_crop_offsets(side, side, size)]
            six.append(tf.image.resize(square, [size, size]))
            crops += six + [tf.image.flip_left_right(crop) for crop in six]
    return crops


@dataclasses.dataclass(frozen=True)
class ViewMaker:
    """Makes the [V, S, S, C] float32 0-255 crops of one image (encoded bytes or decoded pixels)."""
    name: str
    image_size: int
    crop_fraction: float
    channels: int
    whole: bool  # the run's eval view resizes the whole image (fixed-size sources)
    max_pixels: int | None = None
    dct_scaling: bool = False

    @property
    def count(self) -> int:
        return VIEWS[self.name][0]

    def __call__(self, image: tf.Tensor, name: tf.Tensor | str = "") -> tf.Tensor:
        size, resize_side = self.image_size, round(self.image_size / self.crop_fraction)
        if self.name in ("center", "flip"):
            crop = preprocess.eval_view(image, size, self.crop_fraction, self.channels, self.whole, self.max_pixels,
                                        name, self.dct_scaling)
            crops = [crop] if self.name == "center" else [crop, tf.image.flip_left_right(crop)]
        else:
            pixels = formats.decode(image, self.channels, self.max_pixels, name) if image.dtype == tf.string \
                else formats.to_channels(image, self.channels)
            pixels = tf.cast(pixels, tf.float32)
            if self.name == "10crop":
                crops = _ten(resize_shorter(pixels, resize_side), size)
            elif self.name == "multiscale":
                crops = [crop for scale in MULTISCALE
                         for crop in _ten(resize_shorter(pixels, round(resize_side * scale)), size)]
            else:
                crops = _googlenet(pixels, size, resize_side)
        return tf.ensure_shape(tf.stack(crops), (self.count, size, size, self.channels))


def view_maker(name: str, config, whole: bool) -> ViewMaker:
    """The views `name` of a run's (resolved) config; `whole`: its eval view resizes the whole image."""
    data = config.data
    return ViewMaker(name, data.image_size, data.crop_fraction, data.channels, whole, data.max_pixels,
                     bool(data.dct_scaling))


def views_dataset(raw: tf.data.Dataset, make: ViewMaker, normalize: Callable, read: Callable,
                  batch_size: int, skip_undecodable: bool = False) -> tf.data.Dataset:
    """(images, labels) batches with images [B, V, S, S, C], normalized: `raw` yields (image, label) as a source
    stores them, `read` turns a stored image into what `make` takes (a path into its bytes). `skip_undecodable`
    (data.on_corrupt: skip): an image that does not decode is left out, as the run's own test split leaves it."""
    def fn(image, label):
        return normalize(make(read(image))), label
    views = raw.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    if skip_undecodable:
        views = views.ignore_errors()
    return views.batch(max(1, batch_size // make.count)).prefetch(tf.data.AUTOTUNE)
