"""GoogLeNet (Inception v1) — Szegedy, Liu, Jia, Sermanet, Reed, Anguelov, Erhan, Vanhoucke, Rabinovich,
"Going Deeper with Convolutions", CVPR 2015 (arXiv:1409.4842).

Table 1 of the paper ("#3x3 reduce" and "#5x5 reduce" are the 1x1 convolutions before the 3x3 and 5x5
ones, "pool proj" the 1x1 convolution after the 3x3 max pool of an inception module; params and ops
are the paper's own rounded figures):

    type            patch/stride  output     depth  #1x1  #3x3red  #3x3  #5x5red  #5x5  pool proj  params  ops
    convolution     7x7/2         112x112x64   1                                                     2.7K    34M
    max pool        3x3/2         56x56x64     0
    convolution     3x3/1         56x56x192    2            64     192                                 112K   360M
    max pool        3x3/2         28x28x192    0
    inception (3a)                28x28x256    2     64     96     128     16      32     32           159K   128M
    inception (3b)                28x28x480    2    128    128     192     32      96     64           380K   304M
    max pool        3x3/2         14x14x480    0
    inception (4a)                14x14x512    2    192     96     208     16      48     64           364K    73M
    inception (4b)                14x14x512    2    160    112     224     24      64     64           437K    88M
    inception (4c)                14x14x512    2    128    128     256     24      64     64           463K   100M
    inception (4d)                14x14x528    2    112    144     288     32      64     64           580K   119M
    inception (4e)                14x14x832    2    256    160     320     32     128    128           840K   170M
    max pool        3x3/2         7x7x832      0
    inception (5a)                7x7x832      2    256    160     320     32     128    128          1072K    54M
    inception (5b)                7x7x1024     2    384    192     384     48     128    128          1388K    71M
    avg pool        7x7/1         1x1x1024     0
    dropout (40%)                 1x1x1024     0
    linear                        1x1x1000     1                                                    1000K     1M
    softmax                       1x1x1000     0

Figure 3 adds what the table leaves out: local response normalization after the first max pool and
after the 3x3 convolution of the stem, and two auxiliary classifiers on the outputs of 4a and 4d
(Sec. 5): 5x5/3 average pool, 1x1 convolution with 128 filters, fully connected 1024, dropout 70%,
linear + softmax; their losses are added to the total with weight 0.3 during training only.

The default (`batch_norm=False`, `kernel_5x5=5`) is the paper's network: convolutions with biases and
ReLU, no batch norm, LRN in the stem (size 5, alpha 1e-4, beta 0.75, the BVLC Caffe replication's
values). `batch_norm=True` puts batch norm after every convolution (no biases, no LRN), and with
`kernel_5x5=3` the "5x5" branch uses a 3x3 convolution: together they are torchvision's GoogLeNet
(whose parameter count, 6,624,904, they reproduce exactly).

torchvision's GoogLeNet also pads and pools differently; `padding="torch"` computes its function (the
paper's TF-style "same" padding stays the default): the 7x7/2 convolution pads 3 pixels on every side (TF's
"same" pads 2 before and 3 after on a 224 px image), the stride-2 max pools take no padding and round their
output size up (PyTorch's ceil_mode: the last window may hang over the bottom/right edge), the pool before 5a
is 2x2/2 instead of 3x3/2, and the auxiliary classifiers pool adaptively to 4x4 (windows of 4 starting at 0,
3, 7, 10 on 14x14, where the paper's 5x5/3 starts at 0, 3, 6, 9). `transform_input=True` is torchvision's
`transform_input`: the model takes images normalized with the ImageNet mean and std and rescales them to
the [-1, 1] range Google's weights were trained on. `shared/classification/torchvision_weights.py` imports
torchvision's weights into `batch_norm=True, kernel_5x5=3, padding="torch"`.

`small_input=True` replaces the whole stem (7x7/2 convolution to the second max pool, LRN included) with
one 3x3/1 convolution to 192 channels, so a 28 px image enters 3a at 28x28, the grid that 224 px
ImageNet images reach 3a with. The auxiliary pools adapt to any grid (see `aux_pool`). `width` scales
every channel count of Table 1 (1.0 in the paper), for the fast models of tests and CPU runs.
"""

import keras
from keras import layers, ops

# Table 1, inception modules in network order: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
POOL_AFTER = ("3b", "4e")  # the 3x3/2 max pools between the inception stages
STEM = {"conv1": 64, "conv2_reduce": 64, "conv2": 192}  # 7x7/2 conv, 1x1 "3x3 reduce", 3x3 conv
STEM_STRIDE = 8  # 224 px -> 28x28 at 3a
AUX_TAPS = {"aux1": "4a", "aux2": "4d"}  # auxiliary classifiers and the module outputs they read
AUX_CONV, AUX_FC, AUX_DROPOUT = 128, 1024, 0.7
AUX_GRID = 4  # the paper's 5x5/3 average pool turns 4a's and 4d's 14x14 into 4x4
AUX_LOSS_WEIGHTS = {"aux1": 0.3, "aux2": 0.3}  # Sec. 5; the main output "predictions" has weight 1
LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}  # BVLC Caffe replication (train_val.prototxt)
BN_EPSILON = 1e-3  # torchvision's value for GoogLeNet
BN_MOMENTUM = 0.9  # Caffe/torch value, as in models/resnet
PADDINGS = ("same", "torch")  # TF's "same" padding, or PyTorch's symmetric padding and ceil_mode pools
POOL_BEFORE_5A_TORCH = 2  # torchvision's maxpool4 is 2x2/2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what transform_input undoes


@keras.saving.register_keras_serializable(package="googlenet")
class LocalResponseNormalization(layers.Layer):
    """Across-channel LRN as in Caffe (and AlexNet, Krizhevsky et al. 2012, Sec. 3.3):
    x / (k + alpha / size * sum of x^2 over `size` neighbouring channels) ^ beta, zero-padded at the ends.
    (tf.nn.local_response_normalization takes alpha without the division by size.)"""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def call(self, x):
        half, channels = self.size // 2, x.shape[-1]
        squared = ops.pad(ops.square(x), [[0, 0], [0, 0], [0, 0], [half, self.size - 1 - half]])
        window = squared[..., 0:channels]
        for offset in range(1, self.size):
            window = window + squared[..., offset:offset + channels]
        return x / ops.power(self.k + self.alpha / self.size * window, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}


@keras.saving.register_keras_serializable(package="googlenet")
class TransformInput(layers.Layer):
    """torchvision's `transform_input`: channels normalized with the ImageNet mean and std ((v - mean) / std, v in
    [0, 1]) to (v - 0.5) / 0.5, the range Google's weights were trained on, as torchvision computes it:
    x * (std / 0.5) + (mean - 0.5) / 0.5. (The constants in the compute dtype: Keras' Rescaling rounds them to
    float32 under any policy.)"""

    def call(self, x):
        scale = ops.convert_to_tensor([std / 0.5 for std in IMAGENET_STD], dtype=x.dtype)
        offset = ops.convert_to_tensor([(mean - 0.5) / 0.5 for mean in IMAGENET_MEAN], dtype=x.dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape


def channels(count: int, width: float) -> int:
    """A Table 1 channel count scaled by `width` (at least 1)."""
    return max(1, int(round(count * width)))


def conv(x, filters: int, kernel_size: int, strides: int, batch_norm: bool, name: str, padding: str = "same"):
    """Convolution + ReLU, the unit of every row of Table 1; with batch norm in between (and no bias)
    when `batch_norm`. `padding="torch"` pads a strided convolution by kernel_size // 2 on every side."""
    if padding == "torch" and strides > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="valid" if padding == "torch" and strides > 1
                      else "same", use_bias=not batch_norm, kernel_initializer="he_normal", name=f"{name}_conv")(x)
    if batch_norm:
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def max_pool(x, name: str, strides: int = 2, padding: str = "same", size: int = 3):
    """A `size`x`size` max pool: "same" padding, or with `padding="torch"` and stride 2 PyTorch's ceil_mode
    (no padding, the output size rounded up): the missing bottom/right pixels are zeros, which change no
    maximum here as every pool follows a ReLU (the windows hold at least one input pixel, all >= 0)."""
    if padding != "torch" or strides == 1:
        return layers.MaxPooling2D(size, strides=strides, padding="same", name=name)(x)
    missing = [max(0, -(-(side - size) // strides) * strides + size - side) for side in x.shape[1:3]]
    if any(missing):
        x = layers.ZeroPadding2D(((0, missing[0]), (0, missing[1])), name=f"{name}_ceil_pad")(x)
    return layers.MaxPooling2D(size, strides=strides, padding="valid", name=name)(x)


def stem(x, batch_norm: bool, small_input: bool, width: float, padding: str = "same"):
    """Everything before 3a (Fig. 3): 7x7/2 conv, 3x3/2 max pool, LRN, 1x1 conv, 3x3 conv, LRN,
    3x3/2 max pool on ImageNet (stride 8); one 3x3/1 conv for small images (stride 1). LRN only
    without batch norm, which replaced it in the later Inception networks and in torchvision."""
    if small_input:
        return conv(x, channels(STEM["conv2"], width), 3, 1, batch_norm, name="conv1_3x3")
    x = conv(x, channels(STEM["conv1"], width), 7, 2, batch_norm, name="conv1_7x7", padding=padding)
    x = max_pool(x, name="pool1", padding=padding)
    if not batch_norm:
        x = LocalResponseNormalization(**LRN, name="pool1_norm1")(x)
    x = conv(x, channels(STEM["conv2_reduce"], width), 1, 1, batch_norm, name="conv2_3x3_reduce")
    x = conv(x, channels(STEM["conv2"], width), 3, 1, batch_norm, name="conv2_3x3")
    if not batch_norm:
        x = LocalResponseNormalization(**LRN, name="conv2_norm2")(x)
    return max_pool(x, name="pool2", padding=padding)


def inception_module(x, filters: tuple, batch_norm: bool, kernel_5x5: int, width: float, name: str):
    """Fig. 2(b): 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3/1 max pool -> 1x1, concatenated on channels."""
    n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj = (channels(f, width) for f in filters)
    branch1 = conv(x, n1x1, 1, 1, batch_norm, name=f"{name}_1x1")
    branch2 = conv(x, n3x3_reduce, 1, 1, batch_norm, name=f"{name}_3x3_reduce")
    branch2 = conv(branch2, n3x3, 3, 1, batch_norm, name=f"{name}_3x3")
    branch3 = conv(x, n5x5_reduce, 1, 1, batch_norm, name=f"{name}_5x5_reduce")
    branch3 = conv(branch3, n5x5, kernel_5x5, 1, batch_norm, name=f"{name}_5x5")
    branch4 = max_pool(x, name=f"{name}_pool", strides=1)
    branch4 = conv(branch4, pool_proj, 1, 1, batch_norm, name=f"{name}_pool_proj")
    return layers.Concatenate(name=f"{name}_output")([branch1, branch2, branch3, branch4])


def aux_pool(size: int) -> tuple[int, int]:
    """(pool size, stride) of an auxiliary classifier's average pool on a `size` grid: stride size // 4
    and pool size - 3 * stride, which give a 4x4 output, as the paper's 5x5/3 does on 4a's and 4d's 14x14
    (exactly 5x5/3 there). Grids smaller than 4 are not pooled."""
    if size < AUX_GRID:
        return 1, 1
    stride = size // AUX_GRID
    return size - (AUX_GRID - 1) * stride, stride


def aux_classifier(x, num_classes: int, batch_norm: bool, width: float, name: str, padding: str = "same"):
    """Sec. 5: average pool to 4x4, 1x1 conv 128 + ReLU, FC 1024 + ReLU, dropout 70%, linear + softmax.
    The pool is `aux_pool`'s, or with `padding="torch"` torchvision's adaptive one."""
    if padding == "torch":
        x = layers.AdaptiveAveragePooling2D(AUX_GRID, name=f"{name}_pool")(x)
    else:
        (pool_h, stride_h), (pool_w, stride_w) = aux_pool(x.shape[1]), aux_pool(x.shape[2])
        x = layers.AveragePooling2D((pool_h, pool_w), strides=(stride_h, stride_w), name=f"{name}_pool")(x)
    x = conv(x, channels(AUX_CONV, width), 1, 1, batch_norm, name=f"{name}_1x1")
    x = layers.Flatten(name=f"{name}_flatten")(x)
    x = layers.Dense(channels(AUX_FC, width), activation="relu", name=f"{name}_fc")(x)
    x = layers.Dropout(AUX_DROPOUT, name=f"{name}_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", name=name, dtype="float32")(x)


def trunk(inputs, batch_norm: bool, small_input: bool, kernel_5x5: int, width: float, padding: str = "same",
          transform_input: bool = False) -> dict:
    """Stem to 5b; returns every inception module's output by its Table 1 name, in network order."""
    if kernel_5x5 not in (3, 5):
        raise ValueError(f"kernel_5x5 must be 5 (the paper) or 3 (torchvision), got {kernel_5x5}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if padding not in PADDINGS:
        raise ValueError(f"GoogLeNet padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    x = TransformInput(name="transform_input")(inputs) if transform_input else inputs
    x = stem(x, batch_norm, small_input, width, padding)
    modules = {}
    for name, filters in INCEPTION.items():
        x = inception_module(x, filters, batch_norm, kernel_5x5, width, name=f"inception_{name}")
        modules[name] = x
        if name in POOL_AFTER:
            size = POOL_BEFORE_5A_TORCH if padding == "torch" and name == POOL_AFTER[-1] else 3
            x = max_pool(x, name=f"pool_{name}", padding=padding, size=size)
    return modules


def feature_strides(small_input: bool) -> dict:
    """Module name -> stride of its output: 3b, 4e, 5b at 8, 16, 32 (ImageNet stem) or 1, 2, 4."""
    stride = 1 if small_input else STEM_STRIDE
    return {"3b": stride, "4e": stride * 2, "5b": stride * 4}


def backbone(input_shape: tuple = (224, 224, 3), batch_norm: bool = False, small_input: bool = False,
             kernel_5x5: int = 5, width: float = 1.0, padding: str = "same", transform_input: bool = False
             ) -> keras.Model:
    """The convolutional trunk as a model whose outputs are the last module of each resolution keyed by
    stride: "stride_8" (3b), "stride_16" (4e), "stride_32" (5b); 1, 2, 4 with `small_input`."""
    inputs = keras.Input(shape=input_shape, name="image")
    modules = trunk(inputs, batch_norm, small_input, kernel_5x5, width, padding, transform_input)
    outputs = {f"stride_{stride}": modules[name] for name, stride in feature_strides(small_input).items()}
    return keras.Model(inputs, outputs, name="googlenet_backbone")


def build(num_classes: int = 1000, input_shape: tuple = (224, 224, 3), dropout: float = 0.4,
          aux_heads: bool = False, batch_norm: bool = False, small_input: bool = False,
          kernel_5x5: int = 5, width: float = 1.0, padding: str = "same", transform_input: bool = False
          ) -> keras.Model:
    """GoogLeNet classifier: trunk, global average pool (7x7/1 at 224 px), dropout, `num_classes`-way
    softmax named "predictions". With `aux_heads` the model also has the two auxiliary classifiers and
    returns {"predictions", "aux1", "aux2"}; train with loss weights 1 and AUX_LOSS_WEIGHTS and infer
    with keras.Model(model.inputs, model.get_layer("predictions").output), which drops them."""
    inputs = keras.Input(shape=input_shape, name="image")
    modules = trunk(inputs, batch_norm, small_input, kernel_5x5, width, padding, transform_input)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(modules["5b"])
    x = layers.Dropout(dropout, name="dropout")(x)
    predictions = layers.Dense(num_classes, activation="softmax", name="predictions",
                       dtype="float32")(x)  # float32 probabilities under mixed precision
    if not aux_heads:
        return keras.Model(inputs, predictions, name="googlenet")
    outputs = {"predictions": predictions}
    for head, tap in AUX_TAPS.items():
        outputs[head] = aux_classifier(modules[tap], num_classes, batch_norm, width, name=head,
                                       padding=padding)
    return keras.Model(inputs, outputs, name="googlenet")
