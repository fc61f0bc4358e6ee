"""Multi-crop test views (`test --run RUN --views ...`): the crop coordinates against hand-computed cases, the
counts of each protocol, and a run tested through them with its figures recorded and listed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from shared import commands, runner, runs
from shared.classification import views


def test_the_table_and_the_command_line_name_the_same_views():
    assert commands.TEST_VIEWS == tuple(views.VIEWS)


def test_corner_and_centre_offsets_by_hand():
    # 256 x 341 (a 500 x 375 photo resized to a 256 shorter side), 224 px crops: 32 rows and 117 columns to spare
    assert views.five_crop_offsets(256, 341, 224) == [(0, 0), (0, 117), (32, 0), (32, 117), (16, 58)]
    assert views.five_crop_offsets(32, 32, 28) == [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]  # Fashion-MNIST at 28
    # GoogLeNet's three squares: left, centre, right of a wide image; top, middle, bottom of a tall one
    assert views.square_offsets(256, 341) == [(0, 0), (0, 42), (0, 85)]
    assert views.square_offsets(341, 256) == [(0, 0), (42, 0), (85, 0)]


def coordinates(height: int, width: int) -> tf.Tensor:
    """An image whose first channel is its row and second its column (third 0), float."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    return tf.constant(np.stack([rows, cols, np.zeros_like(rows)], -1))


def test_ten_crops_are_the_corners_the_centre_and_their_reflections():
    image = coordinates(256, 341)  # already at the resize side (224 / 0.875 = 256): the resize keeps every pixel
    make = views.ViewMaker("10crop", 224, 0.875, 3, whole=False)
    crops = make(image).numpy()
    assert crops.shape == (10, 224, 224, 3)
    for index, (top, left) in enumerate(views.five_crop_offsets(256, 341, 224)):
        assert tuple(crops[index, 0, 0, :2]) == (top, left)  # each crop's first pixel is its offset
        assert tuple(crops[index, -1, -1, :2]) == (top + 223, left + 223)
        assert np.array_equal(crops[index + 5], crops[index][:, ::-1])  # then the five reflected


@pytest.mark.parametrize("name, count", [("center", 1), ("flip", 2), ("10crop", 10), ("multiscale", 30),
                                         ("144crop", 144)])
def test_each_protocol_makes_its_number_of_crops(name, count):
    make = views.ViewMaker(name, 16, 0.875, 3, whole=False)
    assert make.count == count == views.VIEWS[name][0]
    pixels = tf.cast(tf.random.stateless_uniform((20, 30, 3), (1, 2), maxval=255), tf.uint8)
    assert make(pixels).shape == (count, 16, 16, 3)
    encoded = tf.io.encode_png(pixels)  # an encoded image is decoded whole first (or, center / flip, as ever)
    assert make(encoded).shape == (count, 16, 16, 3)
    if name == "flip":
        crops = make(encoded).numpy()
        assert np.array_equal(crops[1], crops[0][:, ::-1])


def test_googlenet_crops_include_each_square_resized_whole():
    image = coordinates(256, 341)
    crops = views.ViewMaker("144crop", 224, 0.875, 3, whole=False)(image).numpy()
    # scale 1 (shorter side 256), the left square (columns 0-255): crops 0-4 its corners and centre, crop 5 the
    # square resized to 224, crops 6-11 their reflections
    assert tuple(crops[0, 0, 0, :2]) == (0, 0) and tuple(crops[1, 0, 0, :2]) == (0, 32)
    assert crops[5, :, :, 1].max() > 250  # the whole square: its columns reach 255 (bilinear, resized)
    assert tuple(crops[12, 0, 0, :2]) == (0, 42)  # the centre square's top-left corner crop


@pytest.mark.slow
def test_a_run_tested_with_views_records_and_lists_them(trained_run, tmp_path, capsys):
    source, _ = trained_run
    run_dir = tmp_path / "resnet" / "v0001"
    shutil.copytree(source.path, run_dir)
    recorded = json.loads((run_dir / "test_metrics.json").read_text())
    assert recorded["views"] == "center"

    assert runner.main(["test", "--run", str(run_dir), "--views", "center"]) == 0
    assert f"center views: test top-1 {recorded['top1']:.4f}" in capsys.readouterr().out  # the run's own view
    assert runner.main(["test", "--run", str(run_dir), "--views", "10crop"]) == 0
    out = capsys.readouterr().out
    assert "10crop views: test top-1 " in out
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(metrics["by_view"]) == {"center", "10crop"} and metrics["top1"] == recorded["top1"]
    assert metrics["by_view"]["10crop"]["examples"] == recorded["examples"]
    assert 0.0 <= metrics["by_view"]["10crop"]["top1"] <= 1.0
    listed = runs.table([runs.open_run(run_dir)])
    assert "views" in listed.splitlines()[0]
    assert f"10crop {metrics['by_view']['10crop']['top1']:.4f}" in listed


def test_views_are_refused_by_a_task_without_them(tmp_path, capsys):
    run_dir = tmp_path / "resnet" / "v0001"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("task: deblur\nmodel: {name: resnet}\n")
    (run_dir / "status.json").write_text('{"status": "finished"}')
    assert runner.main(["test", "--run", str(run_dir), "--views", "10crop"]) == 2
    assert "--views applies to classification runs; run" in capsys.readouterr().err


def test_an_image_that_does_not_decode_is_left_out_where_the_run_skips_them():
    good = tf.io.encode_png(tf.zeros((20, 30, 3), tf.uint8))
    raw = tf.data.Dataset.from_tensor_slices(([good, tf.constant(b"\x89PNG\r\n\x1a\n broken"), good], [0, 1, 2]))
    make = views.ViewMaker("10crop", 16, 0.875, 3, whole=False)
    batches = views.views_dataset(raw, make, lambda x: x, lambda x: x, 64, skip_undecodable=True)
    assert [labels.numpy().tolist() for _, labels in batches] == [[0, 2]]
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(views.views_dataset(raw, make, lambda x: x, lambda x: x, 64))
