import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from shared.modelzoo import MODELS_DIR, load_model_module

resnet = load_model_module(MODELS_DIR / "resnet")


def trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.mark.parametrize("depth, torchvision_count", [(18, 11_689_512), (50, 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(depth, torchvision_count):
    # torchvision counts trainable parameters only (BN running statistics are buffers there).
    assert trainable(resnet.build(1000, (224, 224, 3), depth=depth)) == torchvision_count


def test_resnet_backbone_features_by_stride():
    features = resnet.backbone((64, 64, 3), depth=18, width=8)
    shapes = {name: tuple(t.shape[1:]) for name, t in features.output.items()}
    assert shapes == {"stride_4": (16, 16, 8), "stride_8": (8, 8, 16), "stride_16": (4, 4, 32),
                      "stride_32": (2, 2, 64)}


def test_resnet_small_input_keeps_resolution():
    model = resnet.build(10, (28, 28, 1), depth=18, width=8, small_input=True)
    assert model.get_layer("conv2_block2_out").output.shape[1:3] == (28, 28)
    assert model.predict(np.zeros((2, 28, 28, 1), "float32"), verbose=0).shape == (2, 10)


def test_resnet_rejects_depths_not_in_table_1():
    with pytest.raises(ValueError, match="not in Table 1"):
        resnet.build(10, (32, 32, 3), depth=20)
