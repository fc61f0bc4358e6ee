"""Box-aware detection augmentation (shared/detection/augment.py): SSD's crop and zoom out against
hand-computed boxes, colour jitter leaving boxes alone, seeded determinism through make_dataset, one-line errors
for bad entries, and a tiny detection run training with all three."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared import runner
from shared.config import from_dict
from shared.detection import augment as A
from shared.detection.datasets import MIN_BOX_SIDE, make_dataset
from shared.detection.records import DetectionRecord, DetectionSplit
from shared.errors import UserError

SIZE = 40
OBJECT = [4.0, 10.0, 14.0, 30.0]  # pixel columns 4..13, rows 10..29


def object_image() -> np.ndarray:
    pixels = np.zeros((SIZE, SIZE, 1), np.float32)
    pixels[10:30, 4:14] = 255.0
    return pixels


def lit_box(image: np.ndarray, threshold: float = 127.5) -> list:
    rows, cols = np.nonzero(image[..., 0] > threshold)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def padded(boxes: list, classes: list, rows: int = 4) -> tuple[tf.Tensor, tf.Tensor]:
    box_rows = boxes + [[-1.0] * 4] * (rows - len(boxes))
    return tf.constant(box_rows, tf.float32), tf.constant(classes + [-1] * (rows - len(classes)), tf.int32)


def test_crop_window_clips_a_box_half_outside_and_drops_one_whose_centre_leaves():
    # window x 6..26, y 8..28 (20 x 20, resized x2); OBJECT's centre (9, 20) is inside; the second box overlaps
    # the window (x 20..26) but its centre (27, 23) is outside it
    boxes, classes = padded([OBJECT, [20.0, 20.0, 34.0, 26.0]], [1, 2])
    image, boxes, classes = A.crop_to_window(tf.constant(object_image()), boxes, classes, (8, 6, 20, 20))
    # OBJECT - (6, 8, 6, 8) = (-2, 2, 8, 22), clipped to (0, 2, 8, 20), times 2
    assert boxes.numpy().tolist() == [[0.0, 4.0, 16.0, 40.0]] + [[-1.0] * 4] * 3
    assert classes.numpy().tolist() == [1, -1, -1, -1]
    assert image.shape == (SIZE, SIZE, 1) and lit_box(image.numpy()) == [0, 4, 16, 40]  # the box is on the object


def test_ssd_crop_is_seeded_and_full_coverage_keeps_the_box_whole():
    crop = A.ssd_crop(min_object_covered=[1.0], area=[0.3, 1.0])
    boxes, classes = padded([OBJECT], [1])
    image = tf.constant(object_image())
    windows = [tuple(int(v) for v in crop.window(image, boxes, classes, tf.constant([7, seed])))
               for seed in range(8)]
    assert windows == [tuple(int(v) for v in crop.window(image, boxes, classes, tf.constant([7, seed])))
                       for seed in range(8)]  # the same seeds, the same patches
    assert len(set(windows)) > 1
    for top, left, height, width in windows:  # every patch holds the whole object
        assert left <= 4 and top <= 10 and left + width >= 14 and top + height >= 30
    top, left, height, width = windows[0]
    _, cropped, kept = crop(image, boxes, classes, tf.constant([7, 0]))
    scale = np.array([SIZE / width, SIZE / height] * 2)
    np.testing.assert_allclose(cropped.numpy()[0], (np.array(OBJECT) - [left, top, left, top]) * scale, rtol=1e-6)
    assert kept.numpy().tolist() == [1, -1, -1, -1]


def test_expand_by_two_at_a_known_offset_shifts_and_scales_boxes_exactly():
    boxes, classes = padded([OBJECT], [1])
    canvas, boxes, classes = A.place_on_canvas(tf.constant(object_image()), boxes, classes, tf.constant(20),
                                               tf.constant(5), tf.constant(12), [50.0])
    # OBJECT / 2 + (12, 5, 12, 5)
    assert boxes.numpy().tolist() == [[14.0, 10.0, 19.0, 20.0]] + [[-1.0] * 4] * 3
    assert classes.numpy().tolist() == [1, -1, -1, -1]
    canvas = canvas.numpy()
    assert lit_box(canvas) == [14, 10, 19, 20]
    outside = np.ones((SIZE, SIZE), bool)
    outside[5:25, 12:32] = False
    assert (canvas[..., 0][outside] == 50.0).all()  # the canvas is the fill


def test_expand_ratio_stays_within_max_ratio():
    expand = A.expand([0.0], max_ratio=2.0)
    for seed in range(6):
        boxes, classes = padded([OBJECT], [1])
        _, out, _ = expand(tf.constant(object_image()), boxes, classes, tf.constant([seed, 1]))
        width = float(out[0, 2] - out[0, 0])
        assert 5.0 - 1e-4 <= width <= 10.0 + 1e-4  # OBJECT is 10 wide: shrunk by 1 to 2


def test_color_jitter_leaves_boxes_and_keeps_pixels_in_range():
    augmenter = A.build([{"color_jitter": {"brightness": 0.3, "contrast": 0.5, "saturation": [0.2, 0.8],
                                           "hue": 0.1}}], channels=3, fill=[0.0] * 3, seed=1)
    images = tf.random.stateless_uniform([4, 16, 16, 3], [1, 2], 0, 255)
    boxes = tf.tile(tf.constant([[[1.0, 2.0, 9.0, 12.0], [-1.0] * 4]]), [4, 1, 1])
    classes = tf.tile(tf.constant([[3, -1]]), [4, 1])
    out, out_boxes, out_classes = augmenter.apply_per_batch(images, boxes, classes)
    assert out_boxes.numpy().tolist() == boxes.numpy().tolist()
    assert out_classes.numpy().tolist() == classes.numpy().tolist()
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    assert not np.allclose(out.numpy(), images.numpy())


@pytest.mark.parametrize("entries, fragment", [
    (["ssd_crops"], "did you mean ssd_crop?"),
    ([{"ssd_crop": {"min_iou": [0.5]}}], "takes no argument 'min_iou'"),
    ([{"ssd_crop": {"min_object_covered": [1.5]}}], "fractions in [0, 1]"),
    ([{"expand": {"max_ratio": 0.5}}], "max_ratio must be a number above 1"),
    ([{"color_jitter": {"hue": 0.1}}], "need 3-channel images"),
    (["flip", "expand"], "list it before"),
    ([{"expand": 4}], "must be a name or {name: {argument: value}}"),
])
def test_bad_entries_are_one_line_user_errors(entries, fragment):
    with pytest.raises(UserError) as error:
        A.build(entries, channels=1, fill=[0.0])
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_make_dataset_with_all_three_is_seeded_and_boxes_stay_on_the_object(tmp_path):
    path = tmp_path / "object.png"
    Image.fromarray(object_image()[..., 0].astype(np.uint8)).save(path)
    split = DetectionSplit([DetectionRecord(str(path), SIZE, SIZE, [OBJECT], [1], name="object")] * 8, ["a", "b"])
    config = from_dict({"task": "detection", "data": {"image_size": SIZE, "channels": 1, "deterministic": True},
                        "train": {"batch_size": 8, "seed": 3}, "detection": {"max_boxes": 2}})
    augment = [{"ssd_crop": {"min_object_covered": [0.5, 0.9]}}, {"expand": {"max_ratio": 2}},
               {"color_jitter": {"brightness": 0.05, "contrast": 0.0}}]
    first, again = (next(iter(make_dataset(split, config, training=True, augment=augment))) for _ in range(2))
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
    np.testing.assert_array_equal(first[1]["boxes"].numpy(), again[1]["boxes"].numpy())
    boxes, classes = first[1]["boxes"].numpy(), first[1]["classes"].numpy()
    assert len({tuple(row[0]) for row in boxes}) > 1  # the draws differ between images
    for image, row, labels in zip(first[0].numpy(), boxes, classes):
        if labels[0] < 0:  # the crop cut the object's centre off: no box, so nothing to check
            continue
        assert labels.tolist() == [1, -1]
        width, height = row[0, 2] - row[0, 0], row[0, 3] - row[0, 1]
        assert 0 <= row[0, 0] and row[0, 2] <= SIZE and min(width, height) >= MIN_BOX_SIDE
        # pixels normalized to [-1, 1] (the expand fill is the mean 127.5 -> 0): the lit object is in the box
        np.testing.assert_allclose(lit_box(image, 0.3), row[0], atol=1.5)


@pytest.mark.slow
def test_a_tiny_detection_run_trains_with_ssd_crop_expand_and_color_jitter(tmp_path):
    from conftest import tiny_backbone
    from test_detection_runner import REPO, TINY, data_overrides, tiny_canvases

    generated = tiny_canvases(tmp_path / "canvases")
    runs_dir = tmp_path / "runs"
    augment = "[{ssd_crop: {min_object_covered: [0.3, 0.7]}}, {expand: {max_ratio: 2}}, flip, color_jitter]"
    overrides = [*TINY, tiny_backbone(tmp_path), *data_overrides(generated), f"run.dir={runs_dir}", "train.epochs=1",
                 f"data.augment={augment}"]
    code = runner.main(["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
                        *[arg for item in overrides for arg in ("--set", item)]])
    assert code == 0
    (run_dir,) = (runs_dir / "tiny_backbone").iterdir()
    assert (Path(run_dir) / "metrics.csv").is_file()
