"""Augmentation-function generators, composed from the YAML list `data.augment`.

Each entry is a name, or a one-key mapping `{name: {argument: value}}`. A name resolves, in order, to:
1. a function of the model folder's own `augment.py` (snapshotted with the run);
2. a generator below (`random_crop`, `random_resized_crop`, `alexnet_crop`, `horizontal_flip`);
3. any Keras augmentation layer by class name (`RandomRotation: {factor: 0.05}`, `RandomContrast`, ...).

A generator takes its arguments (plus `image_size` when it asks for it) and returns a function
image -> image on one float32 image with values on the 0-255 scale, applied before normalization.
Generators marked `crops_raw_image` must come first: they cut `image_size` straight out of the decoded
image, replacing the default resize.

`data.batch_augment` lists augmentations that mix the examples of a batch, images and labels together:
Keras' `MixUp: {alpha: 0.2}` (Zhang et al. 2018) and `CutMix: {factor: 1.0}` (Yun et al. 2019). They run
on whole batches after batching, and turn the labels into mixed one-hot vectors.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import keras
import tensorflow as tf

from shared.data import formats
from shared.data.formats import graph_code
from shared.errors import UserError
from shared.frozen import thaw

AugmentFn = Callable[[tf.Tensor], tf.Tensor]


def random_crop(image_size: int, padding: int = 4, seed: int | None = None) -> AugmentFn:
    """Pad by `padding` pixels of zeros, then crop `image_size` at a random place (CIFAR/ResNet style)."""
    @graph_code
    def crop(image):
        padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
        return tf.image.random_crop(padded, [image_size, image_size, tf.shape(image)[-1]], seed=seed)
    return crop


class RandomResizedCrop:
    """Inception-style crop (Szegedy et al. 2014): a random box covering `scale` of the area with aspect
    `ratio`, resized to `image_size`. On encoded images it decodes only that box (fused decode-and-crop)."""

    crops_raw_image = True

    def __init__(self, image_size: int, scale: tuple, ratio: tuple, seed: int | None = None):
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"needs 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                             f"got scale {list(scale)}, ratio {list(ratio)}")
        self.image_size, self.scale, self.ratio, self.seed = image_size, tuple(scale), tuple(ratio), seed

    @graph_code
    def window(self, shape: tf.Tensor) -> tuple:
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.concat([shape[:2], [1]], axis=0), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            area_range=self.scale, aspect_ratio_range=self.ratio, min_object_covered=0.0,
            max_attempts=10, use_image_if_no_bounding_boxes=True, seed=self.seed or 0)
        return begin[0], begin[1], size[0], size[1]

    @graph_code
    def __call__(self, image: tf.Tensor) -> tf.Tensor:
        top, left, height, width = self.window(tf.shape(image))
        cropped = tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))
        return tf.image.resize(cropped, [self.image_size, self.image_size])

    @graph_code
    def from_encoded(self, data: tf.Tensor, channels: int, max_pixels: int | None = None,
                     name: tf.Tensor | str = "", dct_scaling: bool = False) -> tf.Tensor:
        """The box sampled on the image as shown (its EXIF orientation applied), decoded alone (a JPEG's at a DCT
        scale with `dct_scaling`: `formats.decode_crop`'s target)."""
        cropped = formats.decode_crop(data, channels, lambda shown: tf.stack(self.window(shown)), max_pixels, name,
                                      target=self.image_size if dct_scaling else None)
        return tf.image.resize(cropped, [self.image_size] * 2)


def random_resized_crop(image_size: int, scale: tuple = (0.08, 1.0), ratio: tuple = (3 / 4, 4 / 3),
                        seed: int | None = None) -> RandomResizedCrop:
    """Inception-style random crop of 8-100 % of the area, aspect 3/4-4/3, resized to image_size."""
    return RandomResizedCrop(image_size, scale, ratio, seed)


random_resized_crop.crops_raw_image = True


class AlexNetCrop:
    """AlexNet's training crop (Krizhevsky et al. 2012, sections 2 and 4.1): the image's shorter side resized to
    `resize` (256 for 224), its central `resize` x `resize` square, and a random `image_size` patch of that. On
    encoded images it decodes only the central square (a JPEG at a DCT scale with `dct_scaling`, never below
    `resize`)."""

    crops_raw_image = True

    def __init__(self, image_size: int, resize: int | None = None, seed: int | None = None):
        resize = resize or round(image_size * 256 / 224)
        if resize < image_size:
            raise ValueError(f"resize {resize} is smaller than the crop, image_size {image_size}")
        self.image_size, self.resize, self.seed = image_size, resize, seed

    @graph_code
    def _patch(self, square: tf.Tensor) -> tf.Tensor:
        square = tf.image.resize(tf.cast(square, tf.float32), [self.resize, self.resize])
        return tf.image.random_crop(square, [self.image_size, self.image_size, tf.shape(square)[-1]], seed=self.seed)

    @graph_code
    def __call__(self, image: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        return self._patch(tf.slice(image, tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, 0]),
                                    tf.stack([side, side, -1])))

    @graph_code
    def from_encoded(self, data: tf.Tensor, channels: int, max_pixels: int | None = None,
                     name: tf.Tensor | str = "", dct_scaling: bool = False) -> tf.Tensor:
        """The central square of the image as shown, decoded alone, resized, and a random patch of it."""
        def square(shown):
            side = tf.minimum(shown[0], shown[1])
            return tf.stack([(shown[0] - side) // 2, (shown[1] - side) // 2, side, side])
        return self._patch(formats.decode_crop(data, channels, square, max_pixels, name,
                                               target=self.resize if dct_scaling else None))


def alexnet_crop(image_size: int, resize: int | None = None, seed: int | None = None) -> AlexNetCrop:
    """AlexNet's crop: shorter side to `resize` (default 256 x image_size / 224), centre square, random
    image_size patch (add horizontal_flip for the paper's reflections)."""
    return AlexNetCrop(image_size, resize, seed)


alexnet_crop.crops_raw_image = True


def horizontal_flip(seed: int | None = None) -> AugmentFn:
    """Mirror left-right with probability 1/2. TF's own op: keras.layers.RandomFlip("horizontal") does
    the same but cost 25 % of the ImageNet train pipeline's throughput here (scripts/bench_input.py)."""
    return graph_code(lambda image: tf.image.random_flip_left_right(image, seed=seed))


GENERATORS = {f.__name__: f for f in (random_crop, random_resized_crop, alexnet_crop, horizontal_flip)}
KERAS_LAYERS = sorted(name for name in dir(keras.layers) if name.startswith("Random") or name in
                      ("RandAugment", "AutoContrast", "Equalization", "Solarization"))


@dataclass
class Augmentation:
    name: str
    fn: AugmentFn
    crops_raw_image: bool = False


def parse_entry(entry, key: str = "data.augment") -> tuple[str, dict]:
    entry = thaw(entry)  # a frozen config's entry: factories (a model's augment.py too) take YAML's lists and dicts
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        name, kwargs = next(iter(entry.items()))
        if kwargs is None:
            kwargs = {}
        if isinstance(name, str) and isinstance(kwargs, dict):
            return name, kwargs
    raise UserError(f"{key} entry {entry!r} must be a name or {{name: {{argument: value}}}}")


def call_with_checked_args(name: str, factory, kwargs: dict, image_size: int, seed: int,
                            config_key: str = "data.augment"):
    parameters = inspect.signature(factory).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for key in kwargs:
        if key not in parameters and not accepts_any:
            valid = [p for p in parameters if p not in ("image_size", "seed", "kwargs")]
            match = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {match[0]}?" if match else f"valid: {', '.join(valid) or 'none'}"
            raise UserError(f"{config_key} {name} takes no argument {key!r}; {hint}")
    extra = {}
    if "image_size" in parameters:
        extra["image_size"] = image_size
    if "seed" in parameters and "seed" not in kwargs:
        extra["seed"] = seed
    try:
        return factory(**kwargs, **extra)
    except (TypeError, ValueError) as error:
        raise UserError(f"{config_key} {name} {kwargs}: {error}") from None


def build(entries: list, image_size: int, model_augment: ModuleType | None = None,
          seed: int = 0, key: str = "data.augment") -> list[Augmentation]:
    """Turn the config's list into functions, checking every name and argument up front. `key`: the
    config key the list came from, for the error messages (deblur.blur builds its generators here too)."""
    augmentations = []
    for position, entry in enumerate(entries):
        name, kwargs = parse_entry(entry, key)
        factory = getattr(model_augment, name, None) if model_augment else None
        if not callable(factory):
            factory = GENERATORS.get(name) or (getattr(keras.layers, name) if name in KERAS_LAYERS else None)
        if factory is None:
            own = [n for n, f in vars(model_augment).items() if inspect.isfunction(f) and not n.startswith("_")] \
                if model_augment else []
            known = own + list(GENERATORS) + KERAS_LAYERS
            match = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {match[0]}?" if match else f"known: {', '.join(own + list(GENERATORS))}, " \
                                                            f"or a keras.layers.Random* layer"
            raise UserError(f"unknown augmentation {name!r} in data.augment; {hint}")
        fn = call_with_checked_args(name, factory, kwargs, image_size, seed + position, key)
        crops = bool(getattr(factory, "crops_raw_image", False))
        if crops and position != 0:
            raise UserError(f"data.augment {name} crops the decoded image and must be the first entry")
        augmentations.append(Augmentation(name, fn, crops))
    return augmentations


BATCH_LAYERS = ("MixUp", "CutMix")  # Keras layers that take {"images", "labels"} batches


def build_batch(entries: list, seed: int = 0) -> list[Callable]:
    """The batch-mixing Keras layers of `data.batch_augment`, each a function (images, one_hot) ->
    (images, mixed labels)."""
    functions = []
    for position, entry in enumerate(entries):
        name, kwargs = parse_entry(entry)
        if name not in BATCH_LAYERS:
            match = difflib.get_close_matches(name, BATCH_LAYERS, n=1)
            hint = f"did you mean {match[0]}?" if match else f"choose from {', '.join(BATCH_LAYERS)}"
            raise UserError(f"unknown batch augmentation {name!r} in data.batch_augment; {hint} "
                            f"(per-image augmentations go in data.augment)")
        layer = call_with_checked_args(name, getattr(keras.layers, name), kwargs, 0, seed + 100 + position)

        def mix(images, labels, layer=layer):
            mixed = layer({"images": images, "labels": labels}, training=True)
            return mixed["images"], mixed["labels"]
        functions.append(mix)
    return functions
