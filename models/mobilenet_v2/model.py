"""MobileNetV2 — Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018 (arXiv:1801.04381).

Table 2 of the paper. Each row is `n` repeated layers; the first of them has stride `s`, the rest stride 1.
`t` is the expansion factor of a bottleneck, `c` its output channels (scaled by the width multiplier):

    input        operator        t     c      n    s
    224x224x3    conv2d 3x3      -     32     1    2
    112x112x32   bottleneck      1     16     1    1
    112x112x16   bottleneck      6     24     2    2
    56x56x24     bottleneck      6     32     3    2
    28x28x32     bottleneck      6     64     4    2
    14x14x64     bottleneck      6     96     3    1
    14x14x96     bottleneck      6     160    3    2
    7x7x160      bottleneck      6     320    1    1
    7x7x320      conv2d 1x1      -     1280   1    1
    7x7x1280     avgpool 7x7     -     -      1    -
    1x1x1280     conv2d 1x1      -     k      -    -

A bottleneck (Table 1, Fig. 4d) is 1x1 expansion to t*c_in channels + ReLU6, 3x3 depthwise + ReLU6, then a
*linear* 1x1 projection (no activation), with a residual connection when the stride is 1 and the input and
output channel counts agree. Batch norm follows every convolution (Sec. 6.1); the last `conv2d 1x1` (the
classifier) is a dense layer after global average pooling, which is the same thing.

Choices the paper leaves open, taken as Keras Applications takes them so that its ImageNet weight files load
into these models unchanged (same layers, same order, same weight shapes, same layer names):
- width multiplier `alpha` (Sec. 6.1, 0.35-1.4): channels are rounded to multiples of 8 by `_make_divisible`
  (32 * alpha for the first convolution, int(c * alpha) for the bottlenecks); the last 1x1 convolution stays
  1280 for alpha <= 1 and becomes `_make_divisible(1280 * alpha)` above 1;
- the first bottleneck (t = 1) has no expansion convolution (it would not widen anything), as in TF-slim;
- stride-2 depthwise convolutions pad explicitly (one pixel on the bottom/right for even sizes, both sides
  for odd ones, which is what "same" padding does too) and then use "valid" padding;
- batch norm epsilon 1e-3 (Keras Applications' and TF-slim's value; it changes outputs, so weight files need it).

Choices of this project: batch-norm momentum 0.9, the torch value that torchvision's MobileNetV2 and this
project's ResNet use (Keras Applications' 0.999 and TF-slim's 0.997 leave the moving statistics far behind the
weights in runs of a few hundred steps, such as quick.yaml; momentum is not stored in weight files); He-normal
convolution kernels (batch norm follows every convolution, so their scale matters little); optional dropout
before the classifier (the authors' TF-slim code trains with 0.2).

torchvision's MobileNetV2 computes a different function with the same weights in two places, each an option
here with Keras Applications' form the default: `padding="torch"` pads the stride-2 first convolution and
depthwise convolutions with one pixel on every side, as PyTorch does, and `bn_epsilon=1e-5` is torch's batch-norm
epsilon. `shared/classification/torchvision_weights.py` imports torchvision's weights into that form.

`small_input=True` keeps the resolution that 28-64 px images need: the first convolution gets stride 1 instead of
2, and the first stride-2 bottleneck row (c = 24) stride 1 instead of 2. Everything else, weights included, is
unchanged, so the total stride is 8 instead of 32 (a 28 px image ends at 4x4, not 1x1).
"""

import keras
from keras import layers

# Table 2, the bottleneck rows: (expansion t, output channels c, repeats n, stride s).
TABLE_2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
FIRST_CONV_CHANNELS = 32
LAST_CONV_CHANNELS = 1280
CHANNEL_DIVISOR = 8
BN_EPSILON = 1e-3  # Keras Applications' and TF-slim's value, so their weight files give identical outputs
BN_MOMENTUM = 0.9  # torch/torchvision value; Keras Applications' 0.999 (TF-slim 0.997) lags in short runs
KERNEL_INITIALIZER = "he_normal"
PADDINGS = ("same", "torch")  # stride-2 layers: TF's "same" (bottom/right on even maps) or PyTorch's symmetric


def _make_divisible(value: float, divisor: int = CHANNEL_DIVISOR, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of `divisor`, never below `min_value` (default `divisor`)
    and never more than 10% below `value`: the rounding of Keras Applications and TF-slim."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn(x, filters: int, kernel_size: int, strides: int, name: str, bn_name: str, relu_name: str | None,
            padding: str = "same", bn_epsilon: float = BN_EPSILON):
    """Convolution without bias, batch norm and (unless `relu_name` is None) ReLU6; `padding="torch"` pads a
    strided convolution by kernel_size // 2 on every side first."""
    if padding == "torch" and strides > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="valid" if padding == "torch" and strides > 1
                      else "same", use_bias=False, kernel_initializer=KERNEL_INITIALIZER, name=name)(x)
    x = layers.BatchNormalization(epsilon=bn_epsilon, momentum=BN_MOMENTUM, name=bn_name)(x)
    if relu_name is not None:
        x = layers.ReLU(6.0, name=relu_name)(x)
    return x


def pad_for_stride_2(x, name: str, padding: str = "same"):
    """The zero padding a 3x3 stride-2 "valid" convolution needs: "same" gives ceil(size / 2) outputs with one
    pixel on the bottom/right of an even side, one on each end of an odd one (Keras Applications' `correct_pad`);
    "torch" one pixel on every side (PyTorch's padding=1)."""
    if padding == "torch":
        return layers.ZeroPadding2D(1, name=name)(x)
    sides = []
    for size in x.shape[1:3]:
        extra = 1 if size is None or size % 2 == 0 else 0
        sides.append((1 - extra, 1))
    return layers.ZeroPadding2D(padding=tuple(sides), name=name)(x)


def depthwise_bn(x, strides: int, prefix: str, padding: str = "same", bn_epsilon: float = BN_EPSILON):
    """3x3 depthwise convolution, batch norm, ReLU6: the spatial filtering of a bottleneck."""
    if strides == 2:
        x = pad_for_stride_2(x, name=f"{prefix}pad", padding=padding)
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same" if strides == 1 else "valid", use_bias=False,
                               depthwise_initializer=KERNEL_INITIALIZER, name=f"{prefix}depthwise")(x)
    x = layers.BatchNormalization(epsilon=bn_epsilon, momentum=BN_MOMENTUM, name=f"{prefix}depthwise_BN")(x)
    return layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)


def inverted_residual_block(x, expansion: int, filters: int, strides: int, block_id: int, **conv):
    """One bottleneck of Table 1: 1x1 expansion to `expansion` x the input channels (ReLU6), 3x3 depthwise with
    `strides` (ReLU6), linear 1x1 projection to `filters`; residual when stride 1 and channels agree.
    Layer names are Keras Applications' (block 0 is "expanded_conv"). `conv`: padding and bn_epsilon."""
    inputs = x
    in_channels = x.shape[-1]
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    if expansion != 1:
        x = conv_bn(x, expansion * in_channels, 1, 1, name=f"{prefix}expand", bn_name=f"{prefix}expand_BN",
                    relu_name=f"{prefix}expand_relu", **conv)
    x = depthwise_bn(x, strides, prefix, **conv)
    x = conv_bn(x, filters, 1, 1, name=f"{prefix}project", bn_name=f"{prefix}project_BN", relu_name=None, **conv)
    if strides == 1 and in_channels == filters:
        x = layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def trunk(inputs, alpha: float, small_input: bool, padding: str = "same", bn_epsilon: float = BN_EPSILON) -> dict:
    """First convolution, the 17 bottlenecks and the last 1x1 convolution of Table 2; returns the last
    output at every total stride, keyed "stride_<s>", in network order."""
    if alpha <= 0:
        raise ValueError(f"MobileNetV2 width multiplier alpha must be positive, got {alpha}")
    if padding not in PADDINGS:
        raise ValueError(f"MobileNetV2 padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    conv = {"padding": padding, "bn_epsilon": bn_epsilon}
    stride = 1 if small_input else 2
    x = conv_bn(inputs, _make_divisible(FIRST_CONV_CHANNELS * alpha), 3, stride, name="Conv1",
                bn_name="bn_Conv1", relu_name="Conv1_relu", **conv)
    features = {f"stride_{stride}": x}
    block_id = 0
    kept_first_stride_2 = not small_input
    for expansion, channels, repeats, row_strides in TABLE_2:
        if row_strides == 2 and not kept_first_stride_2:
            row_strides, kept_first_stride_2 = 1, True  # small_input: the c = 24 row keeps the resolution
        filters = _make_divisible(int(channels * alpha))
        for i in range(repeats):
            strides = row_strides if i == 0 else 1
            stride *= strides
            x = inverted_residual_block(x, expansion, filters, strides, block_id, **conv)
            features[f"stride_{stride}"] = x
            block_id += 1
    last_channels = _make_divisible(LAST_CONV_CHANNELS * alpha) if alpha > 1.0 else LAST_CONV_CHANNELS
    x = conv_bn(x, last_channels, 1, 1, name="Conv_1", bn_name="Conv_1_bn", relu_name="out_relu", **conv)
    features[f"stride_{stride}"] = x
    return features


def backbone(input_shape: tuple = (224, 224, 3), alpha: float = 1.0, small_input: bool = False, padding: str = "same",
             bn_epsilon: float = BN_EPSILON) -> keras.Model:
    """The convolutional trunk as a model whose outputs are the last feature maps at the three coarsest strides:
    "stride_8" (end of the c = 32 row), "stride_16" (end of the c = 96 row) and "stride_32" (the 1280-channel
    last convolution); with `small_input` the same layers are "stride_2", "stride_4" and "stride_8".
    Its layers are Keras Applications' MobileNetV2 with include_top=False, in the same order."""
    inputs = keras.Input(shape=input_shape, name="image")
    features = trunk(inputs, alpha, small_input, padding, bn_epsilon)
    coarsest = dict(list(features.items())[-3:])
    return keras.Model(inputs, coarsest, name=f"mobilenet_v2_{alpha:g}_backbone")


def build(num_classes: int = 1000, input_shape: tuple = (224, 224, 3), alpha: float = 1.0, dropout: float = 0.0,
          small_input: bool = False, padding: str = "same", bn_epsilon: float = BN_EPSILON) -> keras.Model:
    """MobileNetV2 classifier with width multiplier `alpha`: trunk, global average pool, optional dropout,
    `num_classes`-way softmax named "predictions". `padding="torch"` with `bn_epsilon=1e-5` is torchvision's."""
    inputs = keras.Input(shape=input_shape, name="image")
    features = trunk(inputs, alpha, small_input, padding, bn_epsilon)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(list(features.values())[-1])
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions",
                       dtype="float32")(x)  # float32 probabilities under mixed precision
    return keras.Model(inputs, outputs, name=f"mobilenet_v2_{alpha:g}")

