"""AlexNet — Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks", NIPS 2012.

Sec. 3.5 and Fig. 2 of the paper, five convolutions and three fully-connected layers (output sizes at
224 px; the paper's Fig. 2 says 224 but its arithmetic needs 227 px, or 224 with 2 pixels of padding):

    layer  paper (lrn, two_towers)              default (torchvision)           output (224 px)
    conv1  96  11x11 /4, ReLU, LRN              64  11x11 /4 pad 2, ReLU        55x55
    pool1  3x3 /2 max (overlapping)             same                            27x27
    conv2  256 5x5 pad 2, 2 groups, ReLU, LRN   192 5x5 pad 2, ReLU             27x27
    pool2  3x3 /2 max                           same                            13x13
    conv3  384 3x3 pad 1, ReLU                  384 3x3 pad 1, ReLU             13x13
    conv4  384 3x3 pad 1, 2 groups, ReLU        256 3x3 pad 1, ReLU             13x13
    conv5  256 3x3 pad 1, 2 groups, ReLU        256 3x3 pad 1, ReLU             13x13
    pool5  3x3 /2 max                           same, then adaptive average     6x6
    fc6    dropout 0.5, 4096, ReLU              same                            4096
    fc7    dropout 0.5, 4096, ReLU              same                            4096
    fc8    1000, softmax                        same                            1000

The default is torchvision's single-tower AlexNet ("One weird trick", Krizhevsky 2014): no local response
normalization (LRN), 64/192/384/256/256 channels, 61,100,840 parameters at 224 px / 1000 classes.
`lrn=True` adds the paper's LRN (Sec. 3.3: k=2, n=5, alpha=1e-4, beta=0.75) after conv1 and conv2;
`two_towers=True` uses the paper's channels and its two-GPU connectivity as grouped convolutions
(conv2, conv4 and conv5 see only their own tower's half of the channels; conv3 and the fully-connected
layers see both), 60,965,224 parameters. The paper's network is `lrn=True, two_towers=True`.

`small_input=True`, for 28-64 px images: conv1 becomes 3x3 stride 1 (same padding) instead of 11x11
stride 4, the three max pools pad "same" (28 px: 28 -> 14 -> 7 -> 4), and the adaptive average pool
before fc6 goes to 4x4 instead of 6x6 (an identity at 28 and 32 px). Everything else is as above.
`width` (not in the paper) scales every channel count and fc6/fc7, for models a CPU can train quickly.
"""

import keras
from keras import layers, ops

LRN_SIZE, LRN_K, LRN_ALPHA, LRN_BETA = 5, 2.0, 1e-4, 0.75  # Sec. 3.3
FC_UNITS = 4096

# conv1..conv5 channels: torchvision's single tower, the paper's two towers (both GPUs together).
CHANNELS = {False: (64, 192, 384, 256, 256), True: (96, 256, 384, 384, 256)}
TOWER_GROUPS = {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}  # Fig. 2 connectivity
POOLED_SIZE = {False: 6, True: 4}  # the map fc6 reads, by small_input


@keras.saving.register_keras_serializable(package="alexnet")
class LocalResponseNormalization(layers.Layer):
    """Sec. 3.3: b_i = a_i / (k + alpha * sum_j a_j^2)^beta, the sum over the `size` channels centred on
    channel i (fewer at the ends). alpha is used as the paper writes it (Caffe and PyTorch divide it by
    `size`; tf.nn.local_response_normalization does not). With `groups` > 1 the window stays inside each
    group of channels, as it stayed inside each GPU in the paper."""

    def __init__(self, size: int = LRN_SIZE, k: float = LRN_K, alpha: float = LRN_ALPHA,
                 beta: float = LRN_BETA, groups: int = 1, **kwargs):
        super().__init__(**kwargs)
        if size % 2 != 1:
            raise ValueError(f"LRN size must be odd (a window centred on each channel), got {size}")
        self.size, self.k, self.alpha, self.beta, self.groups = size, k, alpha, beta, groups

    def _window_sum(self, squared):
        """Sum over `size` neighbouring channels: zero-pad the channel axis, add shifted slices."""
        half, channels = self.size // 2, squared.shape[-1]
        padded = ops.pad(squared, [[0, 0]] * (len(squared.shape) - 1) + [[half, half]])
        total = padded[..., 0:channels]
        for shift in range(1, self.size):
            total = total + padded[..., shift:shift + channels]
        return total

    def call(self, inputs):
        squared = ops.square(inputs)
        if self.groups == 1:
            total = self._window_sum(squared)
        else:
            total = ops.concatenate([self._window_sum(part) for part in
                                     ops.split(squared, self.groups, axis=-1)], axis=-1)
        return inputs / ops.power(self.k + self.alpha * total, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "k": self.k, "alpha": self.alpha,
                "beta": self.beta, "groups": self.groups}


def conv_relu(x, filters: int, kernel_size: int, strides: int, padding, groups: int, name: str):
    """One convolution row of the table: explicit zero padding (an int) or "same", then ReLU."""
    if isinstance(padding, int):
        x = layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
        padding = "valid"
    return layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, groups=groups,
                         activation="relu", kernel_initializer="he_normal", name=name)(x)


def normalize(x, lrn: bool, groups: int, name: str):
    """The paper's LRN after conv1 and conv2, when asked for (torchvision drops it)."""
    return LocalResponseNormalization(groups=groups, name=name)(x) if lrn else x


def max_pool(x, small_input: bool, name: str):
    """Overlapping 3x3 stride-2 max pool (Sec. 3.4); "same" padding for small images keeps the border."""
    return layers.MaxPooling2D(3, strides=2, padding="same" if small_input else "valid", name=name)(x)


def scaled(channels: int, width: float) -> int:
    """`width` times the table's channel count, kept even so two towers split it evenly."""
    return max(2, 2 * round(channels * width / 2))


def trunk(inputs, lrn: bool, two_towers: bool, small_input: bool, width: float = 1.0) -> dict:
    """conv1 to pool5; returns four feature maps keyed by their stride (the product of the layer strides:
    4, 8, 16, 32; 1, 2, 4, 8 with `small_input`), each the last map at that stride."""
    c1, c2, c3, c4, c5 = (scaled(c, width) for c in CHANNELS[two_towers])
    groups = {name: g if two_towers else 1 for name, g in TOWER_GROUPS.items()}
    if small_input:
        x = conv_relu(inputs, c1, 3, 1, "same", 1, name="conv1")
        stride = 1
    else:
        x = conv_relu(inputs, c1, 11, 4, 2, 1, name="conv1")
        stride = 4
    # conv1's towers both see the whole image, so one convolution is exact; LRN stays within a tower.
    x = normalize(x, lrn, 2 if two_towers else 1, name="lrn1")
    features = {f"stride_{stride}": x}
    x = max_pool(x, small_input, name="pool1")
    x = conv_relu(x, c2, 5, 1, "same", groups["conv2"], name="conv2")
    x = normalize(x, lrn, groups["conv2"], name="lrn2")
    features[f"stride_{stride * 2}"] = x
    x = max_pool(x, small_input, name="pool2")
    x = conv_relu(x, c3, 3, 1, "same", groups["conv3"], name="conv3")
    x = conv_relu(x, c4, 3, 1, "same", groups["conv4"], name="conv4")
    x = conv_relu(x, c5, 3, 1, "same", groups["conv5"], name="conv5")
    features[f"stride_{stride * 4}"] = x
    features[f"stride_{stride * 8}"] = max_pool(x, small_input, name="pool5")
    return features


def classifier(x, num_classes: int, dropout: float, pooled_size: int, units: int = FC_UNITS):
    """Adaptive average pool to the size fc6 expects, then fc6 and fc7 (4096, ReLU, each after
    dropout, as torchvision places it) and the `num_classes`-way softmax."""
    x = layers.AdaptiveAveragePooling2D(pooled_size, name="avg_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for name in ("fc6", "fc7"):
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
        x = layers.Dense(units, activation="relu", kernel_initializer="he_normal", name=name)(x)
    return layers.Dense(num_classes, activation="softmax", name="predictions",
                       dtype="float32")(x)  # float32 probabilities under mixed precision


def _name(two_towers: bool) -> str:
    return "alexnet_two_towers" if two_towers else "alexnet"


def backbone(input_shape: tuple = (224, 224, 3), lrn: bool = False, two_towers: bool = False,
             small_input: bool = False, width: float = 1.0) -> keras.Model:
    """conv1 to pool5 as a model whose outputs are {"stride_4": conv1 (55x55 at 224 px), "stride_8":
    conv2 (27x27), "stride_16": conv5 (13x13), "stride_32": pool5 (6x6)}; with `small_input` the keys
    are stride_1 .. stride_8 (28, 14, 7, 4 at 28 px). Valid padding makes the maps smaller than
    input/stride; feature pixel i is centred on input pixel stride * i + stride - 1."""
    inputs = keras.Input(shape=input_shape, name="image")
    return keras.Model(inputs, trunk(inputs, lrn, two_towers, small_input, width),
                       name=f"{_name(two_towers)}_backbone")


def build(num_classes: int = 1000, input_shape: tuple = (224, 224, 3), dropout: float = 0.5,
          lrn: bool = False, two_towers: bool = False, small_input: bool = False,
          width: float = 1.0) -> keras.Model:
    """AlexNet classifier: trunk, adaptive average pool, fc6, fc7, `num_classes`-way softmax.
    `width` scales every convolution and fc6/fc7 (1.0 is the table; smaller is for CPU runs)."""
    if width <= 0:
        raise ValueError(f"AlexNet width must be positive, got {width}")
    inputs = keras.Input(shape=input_shape, name="image")
    features = trunk(inputs, lrn, two_towers, small_input, width)
    outputs = classifier(list(features.values())[-1], num_classes, dropout, POOLED_SIZE[small_input],
                         units=max(1, round(FC_UNITS * width)))
    return keras.Model(inputs, outputs, name=_name(two_towers))
