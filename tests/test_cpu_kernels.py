"""ResNet's strided 1x1 convolutions on narrow inputs: oneDNN's backward-weights kernel for them corrupts the heap
(models/resnet/model.py, STRIDED_1X1_MIN_CHANNELS), so such layers subsample first. Same outputs, and training
survives on a CPU with AVX-512, where width 8 at 48 px used to die in its first steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

from shared.modelzoo import MODELS_DIR, load_model_module

REPO = Path(__file__).resolve().parent.parent
resnet = load_model_module(MODELS_DIR / "resnet")


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux, not x86)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def test_subsampled_strided_1x1_gives_the_strided_convolutions_outputs(monkeypatch):
    images = np.random.default_rng(0).normal(size=(2, 18, 18, 3)).astype("float32")  # conv4 subsamples 9 px to 5
    fixed = resnet.build(10, (18, 18, 3), depth=18, width=4, small_input=True)
    monkeypatch.setattr(resnet, "STRIDED_1X1_MIN_CHANNELS", 0)
    strided = resnet.build(10, (18, 18, 3), depth=18, width=4, small_input=True)
    subsampled = [layer.name for layer in fixed.layers if layer.name.endswith("_subsample")]
    assert subsampled == ["conv3_block1_0_subsample", "conv4_block1_0_subsample"]  # inputs of 4 and 8 channels
    assert not [layer.name for layer in strided.layers if layer.name.endswith("_subsample")]
    for layer in strided.layers:
        layer.set_weights(fixed.get_layer(layer.name).get_weights())
    np.testing.assert_allclose(fixed(images, training=True), strided(images, training=True), atol=1e-5)


def test_wide_enough_inputs_keep_the_strided_convolution():
    model = resnet.build(10, (32, 32, 3), depth=18, width=16, small_input=True)
    assert not [layer.name for layer in model.layers if layer.name.endswith("_subsample")]
    assert model.get_layer("conv3_block1_0_conv").strides == (2, 2)


@pytest.mark.slow
@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the oneDNN kernel fault needs a CPU with AVX-512 (avx512f)")
def test_width_8_resnet_trains_with_onednn_on_an_avx512_cpu(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ONEDNN_", "DNNL_"))}
    env.update(TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")  # oneDNN on, its ISA not capped
    overrides = ["train.jit_compile=false", "data.source=synthetic", "data.image_size=48", "data.synthetic_train=8",
                 "data.synthetic_test=8", "train.batch_size=4", "train.epochs=1", "train.steps_per_epoch=2",
                 "train.verbose=0", f"run.dir={tmp_path}"]
    command = [sys.executable, "-m", "shared.runner", "--config", "models/resnet/quick.yaml"]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (status,) = tmp_path.glob("resnet/v*/status.json")
    assert json.loads(status.read_text())["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_kernel_benchmark_measures_a_recipe_with_or_without_label_smoothing(smoothing):
    # With label smoothing the recipe's loss takes one-hot labels (quick.yaml smooths since its third study).
    bench = load_script("bench_cpu_kernels")
    images_per_second = bench.measure(str(REPO / "models" / "resnet" / "quick.yaml"),
                                      ["model.width=4", "data.image_size=16", "train.batch_size=16",
                                       f"train.label_smoothing={smoothing}"], images=32, epochs=2)
    assert images_per_second > 0
