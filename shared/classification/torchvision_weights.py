"""torchvision's ImageNet classifiers in this project's models: reading a state dict file, the form of each model
that computes torchvision's function, and the mapping of tensor names and layouts onto its Keras layers.

The one place that knows how torchvision names and lays out its tensors:

- convolutions: torch OIHW -> Keras HWIO; depthwise (MobileNetV2) torch (C, 1, H, W) -> Keras (H, W, C, 1);
- linear layers: torch (out, in) -> Keras (in, out); a linear layer after a flatten of a feature map (AlexNet's
  fc6 on 256x6x6, GoogLeNet's auxiliary fc1 on 128x4x4) also has its rows reordered, as torch flattens in
  (C, H, W) order and Keras in (H, W, C) order;
- batch norm: weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_variance (torch's
  num_batches_tracked counts steps and is not a weight); the epsilon (torch's 1e-5, GoogLeNet's 1e-3) is a model
  hyperparameter (`TORCHVISION_FORM`);
- GoogLeNet: the auxiliary heads aux1 / aux2 (in torchvision's published file; torchvision returns them only in
  training mode) map to this model's aux1 / aux2 (`aux_heads: true`); `transform_input` (on in torchvision's
  published weights) is the model's `transform_input`, so the run takes ImageNet-normalized images as
  torchvision's model does.

Reading a `.safetensors` file needs the `safetensors` package only; a `.pth` file needs torch (`pip install -e
".[torch]"`). Any file that is not a state dict of the chosen variant is refused in one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np

from shared.errors import UserError, first_line

SOURCE = "torchvision"
MODELS = ("alexnet", "googlenet", "resnet", "mobilenet_v2")
EXTRA = 'pip install -e ".[torch]"'
SKIPPED_SUFFIX = ".num_batches_tracked"  # torch's batch-norm step counter: state, not a weight

# The build() options with which each model computes torchvision's function (models/<name>/notes.md says why).
TORCHVISION_FORM: dict[str, dict] = {
    "alexnet": {"lrn": False, "two_towers": False, "small_input": False, "width": 1.0},  # the default already
    "googlenet": {"batch_norm": True, "kernel_5x5": 3, "padding": "torch", "transform_input": True,
                  "aux_heads": True, "dropout": 0.2, "small_input": False, "width": 1.0},
    "resnet": {"padding": "torch", "stride_in_3x3": True, "bn_epsilon": 1e-5, "conv_bias": False,
               "small_input": False, "width": 64},
    "mobilenet_v2": {"padding": "torch", "bn_epsilon": 1e-5, "dropout": 0.2, "small_input": False, "alpha": 1.0},
}
# torchvision's eval transform: RGB in [0, 1], Normalize(mean, std), Resize(256), CenterCrop(224). The run's data
# keys hold the statistics on the 0-255 scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_DATA = {"image_size": 224, "channels": 3, "num_classes": 1000, "normalize": True,
                    "mean": [round(m * 255, 6) for m in IMAGENET_MEAN],
                    "std": [round(s * 255, 6) for s in IMAGENET_STD], "crop_fraction": 224 / 256}

RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
RESNET_BASIC = (18, 34)
GOOGLENET_MODULES = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")
MOBILENET_V2_BLOCKS = 17
VARIANT_HINTS = {  # what to change when a file is of another variant (or another model)
    "alexnet": "is it torchvision's alexnet state dict?",
    "googlenet": "is it torchvision's googlenet state dict? A file without aux1/aux2 needs --set model.aux_heads=false",
    "resnet": "give the file's depth: --set model.depth=18|34|50|101|152",
    "mobilenet_v2": "is it torchvision's mobilenet_v2 state dict (width 1.0)?",
}


# ---------------------------------------------------------------- reading the file


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch state dict (`.pth` / `.pt`, with torch) or a `.safetensors` file as float32 NumPy arrays by name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors = _read_safetensors(path)
    elif suffix in (".pth", ".pt"):
        tensors = _read_torch(path)
    else:
        raise UserError(f"{path}: give a torchvision state dict as .pth (torch.save(model.state_dict(), ...)) or "
                        f".safetensors")
    if not tensors:
        raise UserError(f"{path} holds no tensors; give the file of torch.save(model.state_dict(), ...)")
    return tensors


def _reason(error: BaseException) -> str:
    """A reader's error in one short sentence (torch's zip reader goes on for several)."""
    return first_line(error).split(". ")[0][:200]


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise UserError(f"reading {path.name} needs the safetensors package: {EXTRA}") from None
    try:
        loaded = load_file(str(path))
    except Exception as error:  # the Rust reader's own error type: a truncated or damaged file
        raise UserError(f"{path} is not a readable .safetensors file (truncated or damaged?): "
                        f"{_reason(error)}") from None
    return {name: np.asarray(value, dtype=np.float32) for name, value in loaded.items()
            if not name.endswith(SKIPPED_SUFFIX)}


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path.name} needs torch: {EXTRA} (or save the state dict as .safetensors, "
                        f"which needs only the safetensors package)") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and weights-only errors alike: the file is not what it should be
        raise UserError(f"{path} is not a torch file torch.load can read as weights (truncated, damaged or not "
                        f"saved by torch.save?): {_reason(error)}") from None
    if not isinstance(loaded, Mapping):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a state dict; save model.state_dict()")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path} is not a state dict: {name!r} holds a {type(value).__name__}, not a tensor "
                            f"(a training checkpoint? save its model's state_dict() alone)")
    return {name: value.detach().to(torch.float32).numpy() for name, value in loaded.items()
            if not name.endswith(SKIPPED_SUFFIX)}


# ---------------------------------------------------------------- the mapping


def _alexnet(hparams: dict) -> Iterator[tuple]:
    for index, layer in zip((0, 3, 6, 8, 10), ("conv1", "conv2", "conv3", "conv4", "conv5")):
        yield f"features.{index}", layer, "conv"
    yield "classifier.1", "fc6", "linear", "flatten"
    yield "classifier.4", "fc7", "linear"
    yield "classifier.6", "predictions", "linear"


def _resnet(hparams: dict) -> Iterator[tuple]:
    depth = hparams["depth"]
    yield "conv1", "conv1_conv", "conv"
    yield "bn1", "conv1_bn", "bn"
    convs = (1, 2) if depth in RESNET_BASIC else (1, 2, 3)
    for stage, blocks in enumerate(RESNET_STAGES.get(depth, ())):
        for block in range(blocks):
            torch_block, keras_block = f"layer{stage + 1}.{block}", f"conv{stage + 2}_block{block + 1}"
            if block == 0 and (stage > 0 or depth not in RESNET_BASIC):  # the projection shortcut
                yield f"{torch_block}.downsample.0", f"{keras_block}_0_conv", "conv"
                yield f"{torch_block}.downsample.1", f"{keras_block}_0_bn", "bn"
            for conv in convs:
                yield f"{torch_block}.conv{conv}", f"{keras_block}_{conv}_conv", "conv"
                yield f"{torch_block}.bn{conv}", f"{keras_block}_{conv}_bn", "bn"
    yield "fc", "predictions", "linear"


def _googlenet_conv(torch_name: str, keras_name: str) -> Iterator[tuple]:
    """torchvision's BasicConv2d: conv (no bias) + bn (eps 1e-3)."""
    yield f"{torch_name}.conv", f"{keras_name}_conv", "conv"
    yield f"{torch_name}.bn", f"{keras_name}_bn", "bn"


def _googlenet(hparams: dict) -> Iterator[tuple]:
    yield from _googlenet_conv("conv1", "conv1_7x7")
    yield from _googlenet_conv("conv2", "conv2_3x3_reduce")
    yield from _googlenet_conv("conv3", "conv2_3x3")
    branches = {"branch1": "1x1", "branch2.0": "3x3_reduce", "branch2.1": "3x3", "branch3.0": "5x5_reduce",
                "branch3.1": "5x5", "branch4.1": "pool_proj"}  # branch3.1 is the "5x5", a 3x3 in torchvision
    for module in GOOGLENET_MODULES:
        for branch, layer in branches.items():
            yield from _googlenet_conv(f"inception{module}.{branch}", f"inception_{module}_{layer}")
    if hparams.get("aux_heads"):
        for head in ("aux1", "aux2"):
            yield from _googlenet_conv(f"{head}.conv", f"{head}_1x1")
            yield f"{head}.fc1", f"{head}_fc", "linear", f"{head}_flatten"
            yield f"{head}.fc2", head, "linear"
    yield "fc", "predictions", "linear"


def _mobilenet_v2(hparams: dict) -> Iterator[tuple]:
    yield "features.0.0", "Conv1", "conv"
    yield "features.0.1", "bn_Conv1", "bn"
    for block in range(1, MOBILENET_V2_BLOCKS + 1):
        torch_block, prefix = f"features.{block}.conv", "expanded_conv_" if block == 1 else f"block_{block - 1}_"
        stages = [] if block == 1 else [("expand", "conv", "expand_BN")]  # the t = 1 block has no expansion
        stages += [("depthwise", "depthwise", "depthwise_BN")]
        for index, (conv, kind, bn) in enumerate(stages):
            yield f"{torch_block}.{index}.0", f"{prefix}{conv}", kind
            yield f"{torch_block}.{index}.1", f"{prefix}{bn}", "bn"
        yield f"{torch_block}.{len(stages)}", f"{prefix}project", "conv"
        yield f"{torch_block}.{len(stages) + 1}", f"{prefix}project_BN", "bn"
    yield "features.18.0", "Conv_1", "conv"
    yield "features.18.1", "Conv_1_bn", "bn"
    yield "classifier.1", "predictions", "linear"


MAPPINGS = {"alexnet": _alexnet, "googlenet": _googlenet, "resnet": _resnet, "mobilenet_v2": _mobilenet_v2}


def _torch_tensors(kind: str, layer) -> list[str]:
    """The torch names (after the prefix) of a layer's Keras weights, in Keras' order."""
    if kind == "bn":
        return ["weight", "bias", "running_mean", "running_var"]
    return ["weight", "bias"] if getattr(layer, "use_bias", False) else ["weight"]


def _to_keras(value: np.ndarray, kind: str, name: str, flatten_shape: tuple | None) -> np.ndarray:
    """One torch tensor in the layout of its Keras weight."""
    if name != "weight" or kind == "bn":
        return value
    if kind == "conv" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if kind == "depthwise" and value.ndim == 4:
        return value.transpose(2, 3, 0, 1)  # (C, 1, H, W) -> (H, W, C, 1)
    if kind == "linear" and value.ndim == 2:
        if flatten_shape is not None:
            height, width, channels = flatten_shape
            if value.shape[1] == height * width * channels:  # torch's (C, H, W) rows in Keras' (H, W, C) order
                value = value.reshape(-1, channels, height, width).transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
        return value.T
    return value  # a rank the layer does not have: the shape check names it


def _layout(kind: str, name: str) -> str:
    return {"conv": "OIHW", "depthwise": "(C, 1, H, W)", "linear": "(out, in)"}.get(kind, "") if name == "weight" \
        else ""


def mapped_weights(model, model_name: str, hparams: dict, state: dict[str, np.ndarray],
                   source: str = "the file") -> tuple[dict[str, list[np.ndarray]], list[dict]]:
    """Each Keras layer's weights from `state` ({layer name: arrays in Keras' order}) and the mapping used
    (one row per torch tensor). The first tensor that does not fit (missing, another shape, or a tensor of the
    file left over) is a one-line UserError naming it."""
    if model_name not in MAPPINGS:
        raise UserError(f"no torchvision mapping for model {model_name!r}; choose one of {', '.join(MODELS)}")
    weights, rows, used = {}, [], set()
    described, hint = variant(model_name, hparams), VARIANT_HINTS[model_name]
    for prefix, layer_name, kind, *flatten in MAPPINGS[model_name](hparams):
        layer = model.get_layer(layer_name)
        flatten_shape = tuple(model.get_layer(flatten[0]).input.shape[1:]) if flatten else None
        arrays = []
        for name, variable in zip(_torch_tensors(kind, layer), layer.weights):
            key = f"{prefix}.{name}"
            if key not in state:
                raise UserError(f"{source} does not fit {described}: tensor {key} is missing (for layer "
                                f"{layer_name}); {hint}")
            value = _to_keras(state[key], kind, name, flatten_shape)
            if tuple(value.shape) != tuple(variable.shape):
                raise UserError(f"{source} does not fit {described}: tensor {key} has shape "
                                f"{tuple(state[key].shape)}, layer {layer_name} needs "
                                f"{_torch_shape(variable.shape, kind, name)}; {hint}")
            arrays.append(value)
            used.add(key)
            rows.append({"torch": key, "keras": f"{layer_name}/{variable.name}", "layout": _layout(kind, name),
                         "flatten": "CHW->HWC" if flatten and kind == "linear" and name == "weight" else ""})
        weights[layer_name] = arrays
    unmapped = [layer.name for layer in model.layers if layer.weights and layer.name not in weights]
    if unmapped:  # a form of the model this mapping does not cover
        raise UserError(f"{described} has layers no torchvision tensor maps to ({', '.join(unmapped[:3])}); import "
                        f"into torchvision's form of the model (leave its model options at their import values)")
    left = [key for key in state if key not in used]
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise UserError(f"{source} does not fit {described}: it has tensor {left[0]} (shape "
                        f"{tuple(state[left[0]].shape)}) that the model does not{more}; {hint}")
    return weights, rows


def _torch_shape(shape, kind: str, name: str) -> tuple:
    """A Keras weight shape in torch's layout, for the message."""
    shape = tuple(shape)
    if name == "weight" and kind == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if name == "weight" and kind == "depthwise" and len(shape) == 4:
        return (shape[2], shape[3], shape[0], shape[1])
    if name == "weight" and kind == "linear" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def expected_tensors(model, model_name: str, hparams: dict) -> dict[str, tuple]:
    """The tensors a torchvision state dict of `model`'s variant holds: torch name -> shape in torch's layout
    (batch-norm step counters left out)."""
    shapes = {}
    for prefix, layer_name, kind, *_ in MAPPINGS[model_name](hparams):
        layer = model.get_layer(layer_name)
        for name, variable in zip(_torch_tensors(kind, layer), layer.weights):
            shapes[f"{prefix}.{name}"] = _torch_shape(variable.shape, kind, name)
    return shapes


def variant(model_name: str, hparams: dict) -> str:
    if model_name == "resnet":
        return f"resnet{hparams.get('depth')}"
    if model_name == "googlenet":
        return f"googlenet (aux_heads: {str(bool(hparams.get('aux_heads'))).lower()})"
    return model_name


def load_into(model, model_name: str, hparams: dict, state: dict[str, np.ndarray],
              source: str = "the file") -> list[dict]:
    """Set every weight of `model` (built in `TORCHVISION_FORM`) from the torchvision state dict `state`;
    returns the mapping used, one row per tensor."""
    weights, rows = mapped_weights(model, model_name, hparams, state, source)
    for layer_name, arrays in weights.items():
        model.get_layer(layer_name).set_weights(arrays)
    return rows


def import_overrides(model_name: str) -> list[str]:
    """The config keys (as `--set` overrides, before the user's own) of an imported torchvision run:
    the model's torchvision form and torchvision's preprocessing."""
    import json

    if model_name not in TORCHVISION_FORM:
        raise UserError(f"--model {model_name}: torchvision weights import into {', '.join(MODELS)}")
    keys = {**{f"model.{key}": value for key, value in TORCHVISION_FORM[model_name].items()},
            **{f"data.{key}": value for key, value in TORCHVISION_DATA.items()}}
    return [f"{key}={json.dumps(value)}" for key, value in keys.items()]
