"""ResNet — He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385).

Table 1 of the paper, with the stages named as there:

    layer     output (224 px)  18-layer        34-layer        50-layer          101-layer          152-layer
    conv1     112x112          7x7, 64, stride 2, then 3x3 max pool, stride 2
    conv2_x   56x56            [3x3,64]x2 x2   [3x3,64]x2 x3   [1x1,64 3x3,64 1x1,256]x3   ...x3    ...x3
    conv3_x   28x28            [3x3,128]x2 x2  ... x4          [1x1,128 ... 1x1,512]x4     ...x4    ...x8
    conv4_x   14x14            [3x3,256]x2 x2  ... x6          [1x1,256 ... 1x1,1024]x6    ...x23   ...x36
    conv5_x   7x7              [3x3,512]x2 x2  ... x3          [1x1,512 ... 1x1,2048]x3    ...x3    ...x3
              1x1              average pool, 1000-d fc, softmax

Choices the paper leaves open, taken as torchvision and Keras Applications take them: batch norm after
every convolution and before the ReLU, no convolution biases (BN makes them redundant), projection
shortcuts (option B) only where the shape changes, and the downsampling stride on the first 1x1
convolution of a bottleneck (the paper's form, "ResNet v1"; torchvision moves it to the 3x3, "v1.5").

torchvision's ResNets compute a different function with the same weights in three places; each is an option
here, the paper's (and Keras Applications') form the default: `padding="torch"` pads every strided 3x3
convolution with one pixel on each side, as PyTorch does (TF's "same" pads only the bottom and right of an
even-sized map, which shifts the sampling grid by one pixel); `stride_in_3x3=True` puts a bottleneck's
downsampling stride on its 3x3 convolution ("v1.5"); `bn_epsilon=1e-5` is torch's batch-norm epsilon.
`shared/classification/torchvision_weights.py` imports torchvision's weights into that form.

`small_input=True` swaps the ImageNet stem for a 3x3 stride-1 convolution without max pool (the paper's
CIFAR-10 networks, Sec. 4.2, also start this way), so 28-64 px images keep their resolution into conv2_x.
`width` scales every stage (64 in the paper); smaller widths give the fast models used for tests and CPU runs.
"""

import keras
from keras import layers

# depth -> (block type, blocks per stage conv2_x..conv5_x), from Table 1.
STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
BOTTLENECK_EXPANSION = 4
BN_EPSILON = 1.001e-5  # Keras Applications' value, so their weight files give identical outputs (torch: 1e-5)
BN_MOMENTUM = 0.9  # Caffe/torch value; Keras' 0.99 makes moving statistics lag behind in short runs
# oneDNN's backward-weights kernel for a strided 1x1 convolution writes past its buffer when the input has fewer
# channels than its channel block (16 with AVX-512, 8 with AVX2): the heap is corrupted and training dies with
# SIGSEGV or "malloc(): ..." (oneDNN issue #6035). Narrower inputs are subsampled first (see conv_bn).
STRIDED_1X1_MIN_CHANNELS = 16
PADDINGS = ("same", "torch")  # TF's "same" (bottom/right on even maps) or PyTorch's symmetric padding


def conv_bn(x, filters: int, kernel_size: int, strides: int, name: str, relu: bool = True,
            bias: bool = False, padding: str = "same", bn_epsilon: float = BN_EPSILON):
    """Convolution, batch norm and (optionally) ReLU: the unit every row of Table 1 is made of.
    `padding`: "same", "valid", or "torch" (a strided 3x3 gets one explicit pixel on every side)."""
    if padding == "torch":
        if kernel_size > 1 and strides > 1:
            x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid" if kernel_size > 1 and strides > 1 else "same"
    if kernel_size == 1 and strides > 1 and x.shape[-1] < STRIDED_1X1_MIN_CHANNELS:
        # A stride-s 1x1 convolution is a stride-1 one on every s-th pixel: same weights, same outputs,
        # without the oneDNN kernel above. A 1x1 average pool picks those pixels (its gradient is cheaper
        # under XLA than a max pool's).
        x = layers.AveragePooling2D(1, strides=strides, padding=padding, name=f"{name}_subsample")(x)
        strides = 1
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=bias,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=bn_epsilon, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    if relu:
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def shortcut(x, filters: int, strides: int, name: str, **conv):
    """Identity where shapes match, else a 1x1 projection (option B of Sec. 3.3)."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    return conv_bn(x, filters, 1, strides, name=f"{name}_0", relu=False, **conv)


def basic_block(x, filters: int, strides: int, name: str, stride_in_3x3: bool = False, **conv):
    """Two 3x3 convolutions (Fig. 5 left), used by ResNet-18/34; the first one downsamples.
    `conv`: conv_bn's bias, padding and bn_epsilon."""
    residual = shortcut(x, filters, strides, name, **conv)
    x = conv_bn(x, filters, 3, strides, name=f"{name}_1", **conv)
    x = conv_bn(x, filters, 3, 1, name=f"{name}_2", relu=False, **conv)
    x = layers.Add(name=f"{name}_add")([residual, x])
    return layers.ReLU(name=f"{name}_out")(x)


def bottleneck_block(x, filters: int, strides: int, name: str, stride_in_3x3: bool = False, **conv):
    """1x1 reduce, 3x3, 1x1 expand by 4 (Fig. 5 right), used by ResNet-50/101/152. The first 1x1 downsamples
    (the paper), or the 3x3 with `stride_in_3x3` (torchvision's "v1.5")."""
    residual = shortcut(x, filters * BOTTLENECK_EXPANSION, strides, name, **conv)
    x = conv_bn(x, filters, 1, 1 if stride_in_3x3 else strides, name=f"{name}_1", **conv)
    x = conv_bn(x, filters, 3, strides if stride_in_3x3 else 1, name=f"{name}_2", **conv)
    x = conv_bn(x, filters * BOTTLENECK_EXPANSION, 1, 1, name=f"{name}_3", relu=False, **conv)
    x = layers.Add(name=f"{name}_add")([residual, x])
    return layers.ReLU(name=f"{name}_out")(x)


def stage(x, block, filters: int, blocks: int, strides: int, name: str, **options):
    """One row of Table 1: `blocks` blocks, the first one downsampling by `strides`."""
    x = block(x, filters, strides, name=f"{name}_block1", **options)
    for i in range(2, blocks + 1):
        x = block(x, filters, 1, name=f"{name}_block{i}", **options)
    return x


def stem(x, width: int, small_input: bool, **conv):
    """conv1 (+ max pool): 7x7/2 and 3x3/2 pool on ImageNet, 3x3/1 and no pool for small images.
    Explicit symmetric padding (3, then 1) as Caffe, torchvision and Keras Applications pad."""
    if small_input:
        return conv_bn(x, width, 3, 1, name="conv1", **conv)
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = conv_bn(x, width, 7, 2, name="conv1", **{**conv, "padding": "valid"})
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def trunk(inputs, depth: int, width: int, small_input: bool, conv_bias: bool = False, padding: str = "same",
          stride_in_3x3: bool = False, bn_epsilon: float = BN_EPSILON) -> dict:
    """conv1 to conv5_x; returns each stage's output keyed by its stride, in network order."""
    if depth not in STAGES:
        raise ValueError(f"ResNet depth {depth} is not in Table 1; choose one of {sorted(STAGES)}")
    if padding not in PADDINGS:
        raise ValueError(f"ResNet padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    block_type, blocks_per_stage = STAGES[depth]
    block = basic_block if block_type == "basic" else bottleneck_block
    conv = {"bias": conv_bias, "padding": padding, "bn_epsilon": bn_epsilon}
    x = stem(inputs, width, small_input, **conv)
    stride = 1 if small_input else 4
    features = {}
    for index, blocks in enumerate(blocks_per_stage):
        strides = 1 if index == 0 else 2
        stride *= strides
        x = stage(x, block, width * 2**index, blocks, strides, name=f"conv{index + 2}", stride_in_3x3=stride_in_3x3,
                  **conv)
        features[f"stride_{stride}"] = x
    return features


def backbone(input_shape: tuple = (224, 224, 3), depth: int = 50, width: int = 64,
             small_input: bool = False, conv_bias: bool = False, padding: str = "same", stride_in_3x3: bool = False,
             bn_epsilon: float = BN_EPSILON) -> keras.Model:
    """The convolutional trunk as a model whose outputs are the stage outputs keyed by stride
    ("stride_4" .. "stride_32" with the ImageNet stem; 1 .. 8 with `small_input`)."""
    inputs = keras.Input(shape=input_shape, name="image")
    features = trunk(inputs, depth, width, small_input, conv_bias, padding, stride_in_3x3, bn_epsilon)
    return keras.Model(inputs, features, name=f"resnet{depth}_backbone")


def build(num_classes: int = 1000, input_shape: tuple = (224, 224, 3), depth: int = 50,
          width: int = 64, small_input: bool = False, conv_bias: bool = False, padding: str = "same",
          stride_in_3x3: bool = False, bn_epsilon: float = BN_EPSILON) -> keras.Model:
    """ResNet-`depth` classifier: trunk, global average pool, `num_classes`-way softmax.
    `conv_bias=True` gives every convolution a bias, as Keras Applications' ResNet50/101/152 have, so
    their ImageNet weight files load (`model.load_weights(path)`). `padding="torch"`, `stride_in_3x3=True`
    and `bn_epsilon=1e-5` together are torchvision's ResNet (see the module docstring)."""
    inputs = keras.Input(shape=input_shape, name="image")
    features = trunk(inputs, depth, width, small_input, conv_bias, padding, stride_in_3x3, bn_epsilon)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(list(features.values())[-1])
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions",
                       dtype="float32")(x)  # float32 probabilities under mixed precision
    return keras.Model(inputs, outputs, name=f"resnet{depth}")
