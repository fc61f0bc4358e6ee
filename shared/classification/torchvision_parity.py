"""Proof that an imported torchvision classifier computes torchvision's function: torchvision's own model, built
here with random weights (no download), saved as a state dict file, imported by `torchvision_weights`, and both
models' logits compared in eval mode on the same normalized images (`check`). Used by
tests/test_torchvision_weights.py and scripts/check_torchvision_parity.py; needs the `.[torch]` extra.

Random weights as torchvision initializes them give batch-norm running statistics (mean 0, variance 1) that
do not match the activations, so deep ResNets' logits grow to thousands and an absolute difference says
little; AlexNet's default initialization (no batch norm) gives logits of order 0.01, where it says as little.
`reference_model` therefore draws AlexNet's weights He-normal (biases N(0, 0.01)), and draws each batch norm's
gamma from U(0.5, 1.5) and beta from N(0, 0.1), then sets its running statistics to those of a calibration batch
(as training would, cumulatively): logits stay of order 1 to 100, as a trained network's do, and every
statistic differs between channels.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared import modelzoo
from shared.classification import torchvision_weights as tvw
from shared.errors import UserError

# variant -> (models/<name>, hyperparameters beside TORCHVISION_FORM, torchvision's constructor and arguments)
VARIANTS = {
    "alexnet": ("alexnet", {}, "alexnet", {}),
    "googlenet": ("googlenet", {}, "googlenet", {"aux_logits": True, "init_weights": True, "transform_input": True}),
    **{f"resnet{depth}": ("resnet", {"depth": depth}, f"resnet{depth}", {}) for depth in tvw.RESNET_STAGES},
    "mobilenet_v2": ("mobilenet_v2", {}, "mobilenet_v2", {}),
}
CALIBRATION_IMAGES = 8
_STUB_OPS = []  # keeps the stub op library (see `torchvision_models`) alive


def torchvision_models():
    """(torch, torchvision.models), or a UserError naming the extra."""
    try:
        import torch
    except ImportError:
        raise UserError(f"the torchvision parity check needs torch and torchvision: {tvw.EXTRA}") from None
    try:
        import torchvision.models
    except ImportError:
        raise UserError(f"the torchvision parity check needs torchvision: {tvw.EXTRA}") from None
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        # A torchvision wheel built for CUDA beside a CPU torch: its C++ ops do not load, and torchvision 0.28
        # registers fake kernels for two of them without checking. The models use none of its ops: declare
        # those two so the import goes through.
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _STUB_OPS.append(library)
        try:
            import torchvision.models
        except ImportError:
            raise UserError(f"the torchvision parity check needs torchvision: {tvw.EXTRA}") from None
    return torch, torchvision.models


def reference_model(variant: str, calibration: np.ndarray, seed: int = 0):
    """torchvision's `variant` with random weights and realistic batch-norm statistics (module docstring), in
    eval mode. `calibration`: normalized NHWC images the statistics are taken from."""
    torch, models = torchvision_models()
    torch.manual_seed(seed)
    _, _, constructor, arguments = VARIANTS[variant]
    model = getattr(models, constructor)(weights=None, **arguments)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    if not norms:  # AlexNet: activations of the same scale through every layer, as trained weights keep them
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                torch.nn.init.normal_(layer.bias, 0.0, 0.01)
    model.train()
    with torch.no_grad():
        for norm in norms:  # gamma and beta first: the statistics are then those of the activations they give
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the calibration batch
        model(torch.from_numpy(np.ascontiguousarray(calibration.transpose(0, 3, 1, 2))))
    return model.eval()


@dataclass
class Parity:
    variant: str
    image_size: int
    float32: dict  # what -> max |torchvision's logit - ours|, both computing in float32
    float64: dict  # the same, both computing in float64 from the same float32 weights: the mapping alone
    torch_rounding: dict  # what -> max |torchvision float32 - torchvision float64|: its own float32 rounding
    logit_scale: dict  # what -> max |torchvision's logit|

    def worst(self, field: str) -> float:
        return max(getattr(self, field).values())


def torch_logits(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """torchvision's eval-mode logits of NHWC `images`, and GoogLeNet's auxiliary heads' (which torchvision
    returns only in training mode) through their own modules on 4a's and 4d's outputs."""
    torch, _ = torchvision_models()
    taps, hooks = {}, []
    for head, tap in (("aux1", "inception4a"), ("aux2", "inception4d")):
        if getattr(model, head, None) is not None:
            hooks.append(getattr(model, tap).register_forward_hook(
                lambda module, inputs, output, head=head: taps.__setitem__(head, output)))
    with torch.no_grad():
        logits = {"predictions": model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))}
        logits.update({head: getattr(model, head)(tapped) for head, tapped in taps.items()})
    for hook in hooks:
        hook.remove()
    return {name: value.numpy() for name, value in logits.items()}


def keras_logits(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Our model's logits: the input of each softmax Dense ("predictions", and aux1 / aux2 where the model has
    them) times its kernel plus its bias."""
    import keras

    heads = [name for name in ("predictions", "aux1", "aux2") if name in {layer.name for layer in model.layers}]
    features = keras.Model(model.inputs, [model.get_layer(name).input for name in heads])([images],
                                                                                             training=False)
    features = features if isinstance(features, (list, tuple)) else [features]
    logits = {}
    for name, feature in zip(heads, features):
        kernel, bias = model.get_layer(name).get_weights()
        logits[name] = np.asarray(feature) @ kernel + bias
    return logits


def imported_model(variant: str, state_file: Path, image_size: int):
    """Our model of `variant` in torchvision's form, built at `image_size` with the file's weights."""
    name, extra, _, _ = VARIANTS[variant]
    module = modelzoo.load_model_module(modelzoo.model_dir(name))
    hparams = modelzoo.resolve_hparams(module, {**tvw.TORCHVISION_FORM[name], **extra})
    model = modelzoo.build_model(module, 1000, (image_size, image_size, 3), hparams)
    tvw.load_into(model, name, hparams, tvw.read_state_dict(state_file), str(state_file))
    return model


def save_state_dict(model, path: Path) -> Path:
    """`model`'s state dict as torch.save writes it (.pth) or as safetensors (.safetensors)."""
    torch, _ = torchvision_models()
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UserError(f"writing {path.name} needs the safetensors package: {tvw.EXTRA}") from None
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def check(variant: str, batches: dict[str, np.ndarray], folder: Path, calibration: np.ndarray) -> Parity:
    """torchvision's `variant` (random weights) against our import of it on each of `batches` (name ->
    normalized NHWC images, all of one size), both computing in float32 (as they run) and in float64 from the same
    float32 weights, where only the mapping can make them differ; and torchvision's own float32 against its
    float64, the rounding float32 itself brings (two frameworks' kernels sum in other orders: deep networks
    amplify that)."""
    import copy

    import keras

    reference = reference_model(variant, calibration)
    state_file = save_state_dict(reference, Path(folder) / f"{variant}.pth")
    size = next(iter(batches.values())).shape[1]
    ours, previous = {}, keras.config.dtype_policy()
    for dtype in ("float32", "float64"):
        keras.config.set_dtype_policy(dtype)
        try:
            ours[dtype] = imported_model(variant, state_file, size)
        finally:
            keras.config.set_dtype_policy(previous)
    references = {"float32": reference, "float64": copy.deepcopy(reference).double()}
    found = {"float32": {}, "float64": {}, "torch_rounding": {}, "logit_scale": {}}
    for batch, images in batches.items():
        theirs = {dtype: torch_logits(model, images.astype(dtype)) for dtype, model in references.items()}
        mine = {dtype: keras_logits(model, images.astype(dtype)) for dtype, model in ours.items()}
        for head in theirs["float32"]:
            key = batch if head == "predictions" else f"{batch} {head}"
            for dtype in ("float32", "float64"):
                found[dtype][key] = float(np.abs(theirs[dtype][head] - mine[dtype][head]).max())
            found["torch_rounding"][key] = float(np.abs(theirs["float32"][head] - theirs["float64"][head]).max())
            found["logit_scale"][key] = float(np.abs(theirs["float64"][head]).max())
    return Parity(variant, size, **found)


def normalized(pixels: np.ndarray) -> np.ndarray:
    """0-255 RGB NHWC pixels as torchvision's Normalize gives them (the imported run's data.mean / data.std)."""
    mean, std = np.array(tvw.TORCHVISION_DATA["mean"]), np.array(tvw.TORCHVISION_DATA["std"])
    return ((pixels - mean) / std).astype(np.float32)


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return normalized(np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)))


def fashion_photographs(folder: str | Path, count: int, size: int) -> np.ndarray:
    """The first `count` Fashion-MNIST test images (photographs of clothes, 28 px grey), resized to `size` and
    repeated to RGB, normalized."""
    import tensorflow as tf

    from shared.fashion_mnist import read_split

    images, _ = read_split(Path(folder), "test")
    pixels = tf.image.resize(images[:count, :, :, None].astype(np.float32), (size, size)).numpy()
    return normalized(np.repeat(pixels, 3, axis=-1))


def folder_photographs(files: list[Path], size: int) -> np.ndarray:
    """Image files through the run's eval view (resize to size / 0.875, central crop), normalized."""
    import tensorflow as tf

    from shared.data import preprocess

    crop = tvw.TORCHVISION_DATA["crop_fraction"]
    return normalized(np.stack([preprocess.eval_view(tf.constant(Path(path).read_bytes()), size, crop, 3, False)
                                .numpy() for path in files]))
