"""What a trained classifier expects of an image: the run's eval view (size, channels, resize or central
crop) and normalization, as one record. Made from a run's config, or read back from the provenance an
export wrote (`assets.extra/export.json`), and applied with `shared.data.preprocess.eval_view`, the one
definition the eval pipeline, the SavedModel's serving signature and `shared.predict` share.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.source_facts import SOURCES

RESIZE, CENTER_CROP = "resize", "center_crop"  # the names export.json records


def resizes_pixels(config) -> bool:
    """Whether the run's eval view resizes the whole image (sources of fixed-size decoded arrays) or
    decodes the central crop (encoded images of any size): shared.data._image_fn decides by the source,
    so we ask the source the same question, from the config where that suffices."""
    data = config.data
    fixed = SOURCES[data.source].fixed_size  # the TFDS fallback of fashion_mnist is fixed-size too
    if fixed is not None:
        return fixed
    try:  # images as stored (TFDS): the dataset's metadata says, without reading (or preparing) the images
        import tensorflow_datasets as tfds

        shape = tfds.builder(data.name, data_dir=data.data_dir).info.features["image"].shape
        return shape[0] is not None and shape[0] == shape[1]
    except Exception:  # not prepared here, no such dataset: the source itself says below
        pass
    from shared.data import sources

    return sources.load(data).fixed_size


@dataclass(frozen=True)
class EvalView:
    image_size: int
    channels: int
    whole: bool  # resize the whole image (True) or take the central crop_fraction square (False)
    crop_fraction: float
    normalize: bool
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    max_pixels: int | None = None  # encoded images above this many pixels are refused (data.max_pixels)
    dct_scaling: bool = False  # a JPEG's central crop decoded at a DCT scale (data.dct_scaling)

    @classmethod
    def from_config(cls, config) -> "EvalView":
        """The view of a run's (resolved) config. Normalization constants are resolved into config.yaml at
        training time; older runs get the source's, fitted to the channels exactly as training did."""
        data = config.data
        mean, std = data.mean, data.std
        if data.normalize:
            from shared.data import normalization_statistics

            mean, std = normalization_statistics(data)
        return cls(data.image_size, data.channels, resizes_pixels(config), data.crop_fraction, data.normalize,
                   tuple(mean) if mean else None, tuple(std) if std else None, data.max_pixels,
                   bool(data.dct_scaling))

    @classmethod
    def from_record(cls, record: dict) -> "EvalView":
        """The view an export recorded (`record()`'s keys, as in assets.extra/export.json)."""
        mean, std = record.get("mean"), record.get("std")
        return cls(int(record["image_size"]), int(record["channels"]), record["preprocessing"] == RESIZE,
                   float(record["crop_fraction"]), bool(record["normalize"]),
                   tuple(mean) if mean else None, tuple(std) if std else None, record.get("max_pixels"),
                   bool(record.get("dct_scaling", False)))  # exports before the key decoded in full

    def record(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels,
                "preprocessing": RESIZE if self.whole else CENTER_CROP, "crop_fraction": self.crop_fraction,
                "normalize": self.normalize, "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None, "max_pixels": self.max_pixels,
                "dct_scaling": self.dct_scaling}

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image_size, self.image_size, self.channels

    def pixels(self, image, name="an input image"):
        """One image (encoded bytes, or decoded H x W x C pixels) -> float32 0-255 pixels of `shape`; an
        encoded one the formats table refuses fails in one line naming it (`name`)."""
        import tensorflow as tf

        from shared.data import preprocess

        if image.dtype == tf.string:  # the decoder traced once a process (a serving signature, predict's pipeline)
            view = preprocess.encoded_eval_view(self.image_size, self.crop_fraction, self.channels, self.max_pixels,
                                                self.dct_scaling, self.whole)
            return view(image, tf.convert_to_tensor(name, tf.string))
        return preprocess.eval_view(image, self.image_size, self.crop_fraction, self.channels, self.whole,
                                    self.max_pixels, name, self.dct_scaling)

    def normalizer(self):
        """pixels -> what the model takes ((pixel - mean) / std, or pixel / 255 when normalization is off)."""
        from shared.data import preprocess

        return preprocess.normalizer(list(self.mean or ()), list(self.std or ()), self.normalize, self.image_size)
