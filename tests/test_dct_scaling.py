"""DCT-scaled JPEG decoding (`data.dct_scaling`): a crop window at least twice the input side is decoded at 1/2,
1/4 or 1/8 of its size by libjpeg, never below the input side, in the train and eval views."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared.config import load_config
from shared.data import augment, formats, preprocess
from shared.eval_view import EvalView

from conftest import tiny_tree


def photo(height: int, width: int, orientation: int | None = None) -> bytes:
    """A smooth photo-like JPEG (gradients and a few soft blobs), with an EXIF orientation when given."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 255, y / height * 255, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], -1)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("side, target, ratio", [(447, 224, 1), (448, 224, 2), (895, 224, 2), (896, 224, 4),
                                                  (1791, 224, 4), (1792, 224, 8), (4000, 224, 8), (31, 16, 1),
                                                  (32, 16, 2)])
def test_the_largest_ratio_that_keeps_the_target_is_chosen(side, target, ratio):
    window = tf.constant([5, 7, side, side + 100])  # the shorter side decides
    assert formats.DCT_RATIOS[int(formats.dct_ratio(window, target))] == ratio
    assert formats.DCT_RATIOS[int(formats.dct_ratio(tf.constant([0, 0, side + 100, side]), target))] == ratio


def test_a_window_scaled_covers_the_window_and_stays_inside_the_scaled_image():
    # hand-computed: rows 100-478 of 479 at 1/8 are scaled rows 12-59 (60 = ceil(479 / 8) rows in all)
    assert formats.scaled_window(tf.constant([100, 37, 379, 604]), 8).numpy().tolist() == [12, 4, 48, 77]
    assert formats.scaled_window(tf.constant([0, 0, 479, 641]), 8).numpy().tolist() == [0, 0, 60, 81]
    assert formats.scaled_window(tf.constant([9, 9, 8, 8]), 2).numpy().tolist() == [4, 4, 5, 5]


@pytest.mark.parametrize("height, width, orientation", [(479, 641, None), (1200, 900, None), (750, 1001, 6),
                                                         (600, 800, 3)])
def test_random_crops_never_decode_below_the_target_and_show_what_a_full_decode_shows(height, width, orientation):
    data = tf.constant(photo(height, width, orientation))
    target = 96
    crop = augment.random_resized_crop(target, seed=3)
    full_decode = formats.decode(data, 3)
    sizes = []
    for seed in range(12):
        box = tf.stack(augment.RandomResizedCrop(target, (0.08, 1.0), (3 / 4, 4 / 3), seed=seed).window(
            tf.shape(full_decode)))
        scaled = formats.decode_crop(data, 3, lambda shown, box=box: box, target=target)
        whole = formats.decode_crop(data, 3, lambda shown, box=box: box)
        short = int(min(box[2], box[3]))
        sizes.append(short)
        assert min(scaled.shape[:2]) >= target  # never below the side it is resized to
        ratio = formats.DCT_RATIOS[int(formats.dct_ratio(box, target))]
        assert ratio == 8 or short < 2 * ratio * target  # the smallest decode that keeps the target
        for axis in (0, 1):  # the scaled pixels that cover the window: at most one more at each end
            assert 0 <= scaled.shape[axis] - whole.shape[axis] / ratio <= 2
        ours = tf.image.resize(tf.cast(scaled, tf.float32), [target, target], antialias=True)
        reference = tf.image.resize(tf.cast(whole, tf.float32), [target, target], antialias=True)
        assert float(tf.reduce_mean(tf.abs(ours - reference))) < 4.0  # the same picture, not a shifted one
    assert max(sizes) >= 2 * target  # some crops were scaled
    assert crop.from_encoded(data, 3, dct_scaling=True).shape == (target, target, 3)


def test_the_eval_view_scales_only_where_the_crop_is_twice_the_input():
    data = tf.constant(photo(480, 640))
    full = preprocess.eval_view(data, 96, 0.875, 3, whole=False)
    scaled = preprocess.eval_view(data, 96, 0.875, 3, whole=False, dct_scaling=True)
    assert scaled.shape == full.shape == (96, 96, 3)
    assert 0 < float(tf.reduce_mean(tf.abs(scaled - full))) < 4.0  # decoded at 1/4 (crop 420 px), resized alike
    small = tf.constant(photo(150, 200))  # a crop of 131 px < 2 x 96: decoded in full either way
    assert np.array_equal(preprocess.eval_view(small, 96, 0.875, 3, whole=False, dct_scaling=True).numpy(),
                          preprocess.eval_view(small, 96, 0.875, 3, whole=False).numpy())


def test_new_runs_record_it_and_runs_recorded_before_it_decode_in_full(tmp_path):
    from shared import lifecycle
    from shared.tasks import task_for

    config = load_config(tree=tiny_tree(tmp_path / "runs"))
    assert config.data.dct_scaling is None
    assert EvalView.from_config(config).dct_scaling is False  # a run's config.yaml without the key: as it trained
    _, _, _, _, task = lifecycle.prepare(task_for(config))
    assert task.config.data.dct_scaling is True  # a new run: on, and its config.yaml says so
    assert EvalView.from_config(task.config).record()["dct_scaling"] is True
    assert EvalView.from_record({**EvalView.from_config(task.config).record(), "dct_scaling": None}).dct_scaling \
        is False
    off = load_config(tree=tiny_tree(tmp_path / "runs", data={"dct_scaling": False}))
    assert lifecycle.prepare(task_for(off))[4].config.data.dct_scaling is False
