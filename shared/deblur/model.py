"""A restoration network on a classification backbone: the model's own `backbone()` as the encoder, a
light decoder with skip connections back to full resolution, and a residual output.

* Encoder: every feature map the backbone returns (as the detector, shared/detection/model.py).
* Decoder (U-Net style: Ronneberger et al. 2015): from the coarsest map up, each level is upsampled (bilinear) to
  the next finer map's size, concatenated with that map (reduced to `decoder_channels` by a 1x1
  convolution first: a MobileNetV2's 1280-channel map would otherwise dominate the decoder) and merged by
  a 3x3 convolution with ReLU. The last level is the input image itself, so the decoder ends at full
  resolution whatever stride the finest map has.
* Residual (as DnCNN, Zhang et al. 2017): output = input + decoder(...). The last convolution starts at
  zero, so an untrained restorer returns its input: training starts at the blurred image's quality.

Every layer the restorer adds is named "decoder_*", plus the output "restored"; the backbone's layers keep
their classification names, so `init.from_run` copies them by name (shared.finetune.initialize_from).
"""

from __future__ import annotations

from types import ModuleType

import keras
from keras import layers

from shared.detection.model import backbone_feature_maps, build_backbone

HEAD_PREFIXES = ("decoder_",)
OUTPUT_NAME = "restored"


def _upsample_to(x, target_shape: tuple[int, int], name: str):
    """Bilinear upsampling to the finer level's size: UpSampling2D for an integer factor, else a resize to
    the exact shape (a 4 px map onto 7 px). Bilinear, not nearest: smooth images are what is restored, and
    XLA has no gradient kernel for a nearest-neighbour resize (train.jit_compile)."""
    (h, w), (th, tw) = x.shape[1:3], target_shape
    if th % h == 0 and tw % w == 0:
        return layers.UpSampling2D((th // h, tw // w), interpolation="bilinear", name=name)(x)
    return layers.Resizing(th, tw, interpolation="bilinear", name=name)(x)


def build_restorer(module: ModuleType, hparams: dict, image_size: int, channels: int,
                   decoder_channels: int = 32) -> keras.Model:
    """The restorer for the model in `module` (a models/<name>/model.py with `backbone()`) and its
    hyperparameters: a keras.Model image [B, S, S, C] -> restored image [B, S, S, C] (float32), both
    normalized as the data pipeline normalizes."""
    backbone = build_backbone(module, hparams, image_size, channels)
    image = backbone.inputs[0]
    maps = list(backbone_feature_maps(backbone).items())  # finest first
    key, x = maps[-1]
    x = layers.Conv2D(decoder_channels, 1, activation="relu", name=f"decoder_lateral_{key}")(x)
    skips = [(k, layers.Conv2D(decoder_channels, 1, activation="relu", name=f"decoder_lateral_{k}")(t))
             for k, t in reversed(maps[:-1])]
    for key, skip in [*skips, ("image", image)]:
        if tuple(x.shape[1:3]) != tuple(skip.shape[1:3]):
            x = _upsample_to(x, tuple(skip.shape[1:3]), name=f"decoder_upsample_{key}")
        x = layers.Concatenate(name=f"decoder_concat_{key}")([x, skip])
        x = layers.Conv2D(decoder_channels, 3, padding="same", activation="relu", kernel_initializer="he_normal",
                          name=f"decoder_conv_{key}")(x)
    residual = layers.Conv2D(channels, 3, padding="same", kernel_initializer="zeros", name="decoder_residual")(x)
    restored = layers.Add(dtype="float32", name=OUTPUT_NAME)([image, residual])
    name = backbone.name.removesuffix("_backbone") + "_restorer"
    return keras.Model(image, restored, name=name)


def head_layer_names(model: keras.Model) -> set[str]:
    """The layers the restorer adds to the backbone: decoder_* and the output."""
    return {layer.name for layer in model.layers if layer.name.startswith(HEAD_PREFIXES) or layer.name == OUTPUT_NAME}
