"""Deblurring pieces (task: deblur): blur generators, PSNR / SSIM, the restorer's form, the pair pipeline,
the classifier comparison. Tiny images, no training."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared import modelzoo
from shared.config import load_config
from shared.config_schema import with_changes
from shared.data import blur
from shared.deblur import evaluate as deblur_evaluate
from shared.deblur.data import make_pairs, pixel_mapping
from shared.deblur.model import build_restorer, head_layer_names
from shared.errors import UserError


def _impulses(count: int = 2, size: int = 15) -> tf.Tensor:
    images = np.zeros((count, size, size, 1), np.float32)
    images[:, size // 2, size // 2, 0] = 255.0
    return tf.constant(images)


def _spread(blurred: np.ndarray) -> np.ndarray:
    """The per-image standard deviation (px, along x) of a blurred centred impulse."""
    weights = blurred[..., 0] / blurred[..., 0].sum(axis=(1, 2), keepdims=True)
    x = np.arange(blurred.shape[2]) - blurred.shape[2] // 2
    return np.sqrt((weights * x[None, None, :] ** 2).sum(axis=(1, 2)))


# ---------------------------------------------------------------- blur generators


def test_gaussian_blur_of_an_impulse_is_the_gaussian_kernel():
    out = blur.build([{"gaussian": {"sigma": 1.5}}])(_impulses(1), 0).numpy()[0, ..., 0]
    x = np.arange(-7, 8)
    one_d = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    kernel = np.outer(one_d, one_d) / np.outer(one_d, one_d).sum()  # 2 * ceil(4.5) + 1 = 11 wide: fits in 15
    kernel[np.abs(x) > 5, :] = 0
    kernel[:, np.abs(x) > 5] = 0
    np.testing.assert_allclose(out, 255.0 * kernel / kernel.sum(), atol=1e-3)


def test_box_and_motion_kernels_of_known_shape():
    box = blur.build([{"box": {"size": 3}}])(_impulses(1, 7), 0).numpy()[0, ..., 0]
    expected = np.zeros((7, 7))
    expected[2:5, 2:5] = 255.0 / 9
    np.testing.assert_allclose(box, expected, atol=1e-3)
    horizontal = blur.build([{"motion": {"length": 5, "angle": 0}}])(_impulses(1, 7), 0).numpy()[0, ..., 0]
    expected = np.zeros((7, 7))
    expected[3, 1:6] = 255.0 / 5
    np.testing.assert_allclose(horizontal, expected, atol=1e-3)
    vertical = blur.build([{"motion": {"length": 5, "angle": 90}}])(_impulses(1, 7), 0).numpy()[0, ..., 0]
    np.testing.assert_allclose(vertical, expected.T, atol=1e-3)


def test_blur_keeps_a_flat_image_flat_up_to_the_border():
    """Kernels sum to 1 and the padding reflects: no darker frame."""
    flat = tf.fill([3, 12, 12, 3], 100.0)
    for entry in ({"gaussian": {"sigma": [1.0, 2.0]}}, {"box": {"size": [3, 5]}}, {"motion": {"length": [3, 7]}}):
        np.testing.assert_allclose(blur.build([entry])(flat, 4).numpy(), 100.0, atol=1e-3)


def test_gaussian_sigma_stays_in_its_range_and_varies_per_image():
    out = blur.build([{"gaussian": {"sigma": [1.0, 2.0]}}], seed=1)(_impulses(16, 21), 3).numpy()
    spread = _spread(out)
    assert spread.min() >= 0.97 and spread.max() <= 2.0  # truncation at 3 sigma narrows it slightly
    assert spread.max() - spread.min() > 0.3


def test_blur_is_determined_by_seed_and_batch_index():
    images = tf.random.stateless_uniform([4, 16, 16, 1], [1, 2], maxval=255.0)
    chain = [{"motion": {"length": [3, 9], "angle": [0, 180]}}, {"noise": {"stddev": [1, 5]}}]
    first = blur.build(chain, seed=5)(images, 7).numpy()
    np.testing.assert_array_equal(first, blur.build(chain, seed=5)(images, 7).numpy())
    assert not np.allclose(first, blur.build(chain, seed=5)(images, 8).numpy())
    assert not np.allclose(first, blur.build(chain, seed=6)(images, 7).numpy())


def test_noise_has_its_standard_deviation_and_stays_in_range():
    out = blur.build([{"noise": {"stddev": 5.0}}])(tf.fill([4, 32, 32, 1], 128.0), 0).numpy()
    assert abs(out.std() - 5.0) < 0.3 and abs(out.mean() - 128.0) < 0.5
    clipped = blur.build([{"noise": {"stddev": 20.0}}])(tf.fill([1, 16, 16, 1], 250.0), 0).numpy()
    assert clipped.max() <= 255.0


@pytest.mark.parametrize("entries, message", [
    ([], "deblur.blur is empty"),
    (["random_crop"], "'random_crop' is not a blur generator"),
    ([{"gaussian": {"sigmaa": 1.0}}], "deblur.blur gaussian takes no argument 'sigmaa'; did you mean sigma?"),
    ([{"gaussian": {"sigma": [2.0, 1.0]}}], "deblur.blur gaussian"),
    ([{"gaussian": {"sigma": 0}}], "sigma must be > 0"),
    ([{"box": {"size": 4}}], "size must be odd"),
    ([["gaussian"]], "deblur.blur entry"),
])
def test_bad_blur_entries_are_one_line_errors(entries, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("[", r"\[")):
        blur.build(entries)


def test_a_kernel_wider_than_the_image_is_refused_when_the_config_is_checked(tmp_path):
    from shared.deblur.task import DeblurTask

    with pytest.raises(UserError, match="sigma 6 needs a 37 px kernel, too wide for 16 px images"):
        DeblurTask(_tiny_config(tmp_path, blur=[{"gaussian": {"sigma": [1.0, 6.0]}}])).check()
    with pytest.raises(UserError, match="motion .* length 40 needs a 41 px kernel"):
        blur.build([{"motion": {"length": 40}}], image_size=16)
    blur.build([{"gaussian": {"sigma": 5.0}}], image_size=16)  # 31 px: 15 px of padding fit in 16
    config = with_changes(_tiny_config(tmp_path), {"data.batch_augment": ["MixUp"]})
    with pytest.raises(UserError, match="data.batch_augment .* remove it"):
        DeblurTask(config).check()


# ---------------------------------------------------------------- PSNR and SSIM


def test_psnr_and_ssim_against_hand_computed_values():
    sharp = tf.zeros([1, 16, 16, 1])
    expected_psnr = 10 * math.log10(255 ** 2 / 100)  # MSE 100
    assert float(deblur_evaluate.psnr(sharp, sharp + 10.0)[0]) == pytest.approx(expected_psnr, abs=1e-3)
    # Out-of-range restored pixels are clipped as a viewer shows them: 300 counts as 255.
    assert float(deblur_evaluate.psnr(sharp + 255.0, sharp + 300.0)[0]) == float("inf")
    a, b, c1 = 100.0, 120.0, (0.01 * 255) ** 2  # flat images: SSIM is the luminance term alone
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    # TF's variance E[x^2] - E[x]^2 in float32 leaves ~1e-3 of the zero variances: 1e-4 of slack
    assert float(deblur_evaluate.ssim(sharp + a, sharp + b)[0]) == pytest.approx(expected, abs=1e-4)
    noisy = tf.random.stateless_uniform([2, 16, 16, 1], [3, 4], maxval=255.0)
    assert float(deblur_evaluate.ssim(noisy, noisy)[0]) == pytest.approx(1.0, abs=1e-6)


def test_evaluation_of_a_known_restorer(tmp_path):
    """Identity restores nothing (gain 0); the sharp image itself is perfect."""
    config = _tiny_config(tmp_path)
    pairs = make_pairs(config)
    identity, _ = deblur_evaluate.evaluate_restorer(lambda images: images, pairs.test, config)
    assert identity["psnr_gain"] == 0.0 and identity["examples"] == 32
    assert identity["psnr_blurred"] < 40.0 and identity["ssim_blurred"] < 0.99
    sharp_by_batch = [sharp for _, sharp, _ in pairs.test]
    batches = iter(sharp_by_batch)
    perfect, gallery = deblur_evaluate.evaluate_restorer(lambda images: next(batches), pairs.test, config)
    assert perfect["psnr_restored"] == float("inf") and perfect["ssim_restored"] == pytest.approx(1.0, abs=1e-5)
    assert gallery["sharp"].shape == (config.deblur.gallery, 16, 16, 1)
    assert deblur_evaluate.plot_gallery(gallery, tmp_path / "deblur.png").stat().st_size > 0
    count = config.deblur.gallery  # a column per image: blurred (with its PSNR), restored (perfect), sharp
    titles = [text.get_text() for text in deblur_evaluate.gallery_figure(gallery).texts]
    assert [title.split(" ")[0] for title in titles] == ["blurred"] * count + ["restored"] * count + ["sharp"] * count
    assert all(title.endswith(" dB") for title in titles[:count])
    assert titles[count:2 * count] == ["restored inf dB"] * count


# ---------------------------------------------------------------- the restorer


@pytest.mark.parametrize("name, hparams", [("resnet", {"depth": 18, "width": 4, "small_input": True}),
                                           ("mobilenet_v2", {"alpha": 0.35, "small_input": True})])
def test_restorer_output_is_input_plus_residual(name, hparams):
    module = modelzoo.load_model_module(modelzoo.model_dir(name, None))
    model = build_restorer(module, hparams, 16, 1, decoder_channels=4)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
    assert model(images).shape == images.shape
    np.testing.assert_allclose(model(images).numpy(), images, atol=1e-6)  # the residual starts at zero
    residual = model.get_layer("decoder_residual")
    kernel, bias = residual.get_weights()
    residual.set_weights([np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32), bias + 0.5])
    probe = keras.Model(model.inputs, [model.output, residual.output])
    restored, predicted = (x.numpy() for x in probe(images))
    assert np.abs(predicted).max() > 0.1
    np.testing.assert_allclose(restored, images + predicted, atol=1e-5)
    head = head_layer_names(model)
    assert "restored" in head and all(n.startswith("decoder_") for n in head - {"restored"})
    assert any(layer.name not in head for layer in model.layers if layer.weights)  # the backbone's


# ---------------------------------------------------------------- pairs


def _tiny_config(tmp_path, **deblur):
    return load_config(tree={
        "task": "deblur", "model": {"name": "resnet", "depth": 18, "width": 4, "small_input": True},
        "data": {"source": "synthetic", "image_size": 16, "channels": 1, "num_classes": 4,
                 "synthetic_train": 64, "synthetic_test": 32},
        "train": {"epochs": 1, "batch_size": 16, "verbose": 0},
        "deblur": {"decoder_channels": 4, "gallery": 4, **deblur}, "run": {"dir": str(tmp_path / "runs")}})


def test_pairs_blur_the_sharp_image_and_repeat_on_the_test_split(tmp_path):
    config = _tiny_config(tmp_path)
    pairs = make_pairs(config)
    blurred, sharp = next(iter(pairs.train))
    assert blurred.shape == sharp.shape == (16, 16, 16, 1)
    to_pixels, _ = pixel_mapping(config)
    # The blurred image is the sharp one through the generator, batch 0 of training.
    expected = blur.build(config.deblur.blur, seed=0)(tf.clip_by_value(to_pixels(sharp), 0, 255), 0)
    np.testing.assert_allclose(to_pixels(blurred).numpy(), expected.numpy(), atol=1e-2)
    first = [b.numpy() for b, _, _ in pairs.test]
    second = [b.numpy() for b, _, _ in pairs.test]
    assert len(first) == 2 and all(np.array_equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- the classifier's view


def test_classifier_top1_of_an_identity_restorer_equals_blurred(tmp_path):
    config = _tiny_config(tmp_path)
    pairs = make_pairs(config)
    module = modelzoo.load_model_module(modelzoo.model_dir("resnet", None))
    classifier = modelzoo.build_model(module, 4, (16, 16, 1), {"depth": 18, "width": 4, "small_input": True})
    identity = build_restorer(module, {"depth": 18, "width": 4, "small_input": True}, 16, 1, 4)  # zero residual
    result = deblur_evaluate.classifier_top1(classifier, config, identity, pairs.test, config)
    assert result["top1_restored"] == result["top1_blurred"] and result["examples"] == 32
    assert 0.0 <= result["top1_sharp"] <= 1.0


def test_a_classifier_of_other_images_or_classes_is_refused(tmp_path):
    config = _tiny_config(tmp_path)
    other = with_changes(_tiny_config(tmp_path), {"task": "classification", "data.image_size": 28})
    with pytest.raises(UserError, match="takes 28 px images of 1 channel"):
        deblur_evaluate.check_classifier(other, config, None, ["a"], "--classifier X")
    other = with_changes(other, {"data.image_size": 16})
    with pytest.raises(UserError, match="first difference at index 1"):
        deblur_evaluate.check_classifier(other, config, ["a", "b"], ["a", "c"], "--classifier X")
    other = with_changes(other, {"task": "detection"})
    with pytest.raises(UserError, match="needs a classification run"):
        deblur_evaluate.check_classifier(other, config, None, ["a"], "--classifier X")


def test_the_deblur_section_is_validated_and_recorded(tmp_path):
    config = _tiny_config(tmp_path, blur=[{"motion": {"length": [3, 5]}}, "noise"])
    assert config.task == "deblur" and config.to_dict()["deblur"]["blur"][1] == "noise"  # the snapshot holds it
    with pytest.raises(UserError, match="deblur.decoder_channels is 0; it must be >= 1"):
        _tiny_config(tmp_path, decoder_channels=0)
    with pytest.raises(UserError, match="deblur.loss is .l3.; choose one of l1, l2"):
        _tiny_config(tmp_path, loss="l3")


def test_a_resumed_run_blurs_its_batches_as_an_uninterrupted_one(tmp_path):
    """make_pairs(start_epoch=1) continues the blur draws where epoch 1 left them, not from batch 0."""
    config = with_changes(_tiny_config(tmp_path), {"data.deterministic": True})
    uninterrupted = make_pairs(config)
    steps = uninterrupted.datasets.steps_per_epoch
    expected = [b.numpy() for b, _ in uninterrupted.train.take(steps + 1)][steps]
    config_again = with_changes(_tiny_config(tmp_path), {"data.deterministic": True})
    first = next(iter(make_pairs(config_again, start_epoch=1).train))[0].numpy()
    np.testing.assert_allclose(first, expected, atol=1e-5)


def test_a_full_disk_while_drawing_deblur_png_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno
    import os

    from shared.durable import DiskFull
    from shared.task import TaskData
    from shared.deblur.task import DeblurTask

    config = _tiny_config(tmp_path)
    data = TaskData(train=None, val=None, steps_per_epoch=0, class_names=[], input_shape=(16, 16, 1),
                    description="", details=make_pairs(config))
    module = modelzoo.load_model_module(modelzoo.model_dir("resnet", None))
    model = DeblurTask(config).build(module, (16, 16, 1))
    _, draw = DeblurTask(config).evaluate(model, data)
    real_replace = os.replace

    def full(source, target):  # the PNG is written, then the rename finds the disk full
        if str(target).endswith("deblur.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFull, match="deblur.png"):
        draw(tmp_path)
    assert list(tmp_path.glob("*deblur.png*")) == []
    monkeypatch.setattr(os, "replace", real_replace)
    draw(tmp_path)
    assert (tmp_path / "deblur.png").stat().st_size > 0
