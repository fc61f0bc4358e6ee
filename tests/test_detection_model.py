"""The detection model path: anchors, target assignment, the detector on each backbone, losses, NMS and
COCO mAP. Tiny models (64 px, widths 4-8) so the whole file runs in about a minute on two CPU cores."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import tensorflow as tf

from shared.callbacks import built_before_fit
from shared.config_schema import DetectionConfig
from shared.detection import anchors as anchors_lib
from shared.detection import losses, metrics, model, postprocess
from shared.errors import UserError
from shared.modelzoo import build_model, load_model_module, model_dir, resolve_hparams

SIZE = 64
TINY = {  # name -> hyperparameters small enough for CPU tests
    "resnet": {"depth": 18, "width": 4},
    "alexnet": {"width": 0.05},
    "googlenet": {"width": 0.1},
    "mobilenet_v2": {"alpha": 0.35},
}


def module(name: str):
    return load_model_module(model_dir(name))


def hparams(name: str, **overrides) -> dict:
    return resolve_hparams(module(name), {**TINY[name], **overrides})


def anchor_centres(anchors) -> np.ndarray:
    a = np.asarray(anchors)
    return np.stack([(a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2], axis=-1)


# ---------------------------------------------------------------- anchors


@pytest.mark.parametrize("name, overrides, expected", [
    ("resnet", {}, {"stride_4": (16, 16), "stride_8": (8, 8), "stride_16": (4, 4), "stride_32": (2, 2)}),
    ("resnet", {"small_input": True},
     {"stride_1": (64, 64), "stride_2": (32, 32), "stride_4": (16, 16), "stride_8": (8, 8)}),
    # valid padding: smaller maps than 64 / stride, so the measured strides are 4.3, 9.1, 21.3 and 64
    ("alexnet", {}, {"stride_4": (15, 15), "stride_8": (7, 7), "stride_16": (3, 3), "stride_32": (1, 1)}),
    ("googlenet", {}, {"stride_8": (8, 8), "stride_16": (4, 4), "stride_32": (2, 2)}),
])
def test_anchor_grid_follows_the_real_feature_shapes(name, overrides, expected):
    config = DetectionConfig()
    backbone = model.build_backbone(module(name), hparams(name, **overrides), SIZE, 3)
    shapes = model.feature_shapes(backbone)
    assert shapes == expected
    assert shapes == {k: tuple(t.shape[1:3]) for k, t in backbone.output.items()}
    per_location = anchors_lib.anchors_per_location(config)
    assert per_location == 9
    grid = anchors_lib.anchor_grid(shapes, SIZE, config).numpy()
    assert grid.shape == (sum(h * w * per_location for h, w in expected.values()), 4)
    centres, offset = anchor_centres(grid), 0
    for h, w in expected.values():
        stride_y, stride_x = SIZE / h, SIZE / w
        level = centres[offset:offset + h * w * per_location]
        # first cell centred at half a stride, last at the image side minus half a stride
        np.testing.assert_allclose(level[0], [stride_x / 2, stride_y / 2], atol=1e-4)
        np.testing.assert_allclose(level[-1], [SIZE - stride_x / 2, SIZE - stride_y / 2], atol=1e-4)
        offset += h * w * per_location


def test_anchor_order_is_level_y_x_scale_ratio():
    config = DetectionConfig(anchor_size=2.0, anchor_scales=[1.0, 2.0], aspect_ratios=[1.0, 4.0])
    grid = anchors_lib.anchor_grid({"fine": (2, 3), "coarse": (1, 1)}, 12, config).numpy()
    assert grid.shape == ((2 * 3 + 1) * 4, 4)
    centres = anchor_centres(grid[:24]).reshape(2, 3, 4, 2)  # [y, x, anchor, (cx, cy)]: y-major
    for y, x in np.ndindex(2, 3):
        np.testing.assert_allclose(centres[y, x], [[4 * x + 2, 6 * y + 3]] * 4, rtol=1e-6)
    y, x, scale, ratio = 1, 0, 1, 1  # fine level: stride_y 6, stride_x 4
    box = grid[((y * 3 + x) * 2 + scale) * 2 + ratio]
    side = 2.0 * math.sqrt(6 * 4) * 2.0  # anchor_size * stride * scale
    width, height = side * 2.0, side / 2.0  # ratio 4 = width / height at the same area
    np.testing.assert_allclose(box, [2 - width / 2, 9 - height / 2, 2 + width / 2, 9 + height / 2], rtol=1e-5)
    np.testing.assert_allclose(grid[24], [6 - 12, 6 - 12, 6 + 12, 6 + 12], rtol=1e-5)  # coarse: stride 12


def test_select_levels_measures_strides():
    alexnet = {"stride_4": (15, 15), "stride_8": (7, 7), "stride_16": (3, 3), "stride_32": (1, 1)}
    with pytest.warns(UserWarning, match=r"\[32\] not available"):
        assert model.select_levels(alexnet, [8, 16, 32], SIZE) == ["stride_8", "stride_16"]
    at_224 = {"stride_4": (55, 55), "stride_8": (27, 27), "stride_16": (13, 13), "stride_32": (6, 6)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.select_levels(at_224, [8, 16, 32], 224) == ["stride_8", "stride_16", "stride_32"]
    small = {"stride_1": (64, 64), "stride_2": (32, 32), "stride_4": (16, 16), "stride_8": (8, 8)}
    with pytest.raises(UserError, match="stride_8 8x8"):
        model.select_levels(small, [32, 64], SIZE)


def test_levels_are_ordered_finest_first_whatever_the_backbone_returns():
    """A backbone returning a list, coarsest first: the detector still predicts finest first, and its
    feature_shapes (hence its anchors) say so."""
    import keras

    def backbone(input_shape=(16, 16, 3), width: int = 4):
        image = keras.Input(input_shape, name="image")
        fine = keras.layers.Conv2D(width, 3, strides=4, padding="same", name="fine")(image)
        coarse = keras.layers.Conv2D(width, 3, strides=2, padding="same", name="coarse")(fine)
        return keras.Model(image, [coarse, fine], name="toy_backbone")

    toy = type("ToyModule", (), {"backbone": staticmethod(backbone), "__file__": "toy/model.py"})
    config = DetectionConfig(strides=[4, 8], fpn_channels=4, head_depth=1, anchor_scales=[1.0])
    detector = model.build_detector(toy, {"width": 4, "dropout": 0.5}, 2, 16, 3, config)  # dropout: not passed
    assert model.feature_shapes(detector) == {"map_1": (4, 4), "map_0": (2, 2)}
    assert model.model_anchors(detector, config).shape == ((16 + 4) * 3, 4)
    assert detector.output["classes"].shape == (None, (16 + 4) * 3, 2)
    assert isinstance(detector.get_layer("fpn_upsample_map_0"), keras.layers.UpSampling2D)
    with pytest.raises(UserError, match="no feature map near"):
        model.build_detector(toy, {}, 2, 16, 3, DetectionConfig(strides=[32]))


# ---------------------------------------------------------------- target assignment


def test_encode_then_decode_returns_the_ground_truth():
    config = DetectionConfig()
    grid = anchors_lib.anchor_grid({"s8": (8, 8), "s16": (4, 4), "s32": (2, 2)}, SIZE, config)
    gt = np.array([[3.0, 5.0, 20.0, 30.0], [30.5, 2.0, 63.0, 60.0], [40.0, 40.0, 44.0, 47.0],
                   [-1, -1, -1, -1]], np.float32)
    classes = np.array([0, 2, 1, -1], np.int32)
    box_targets, class_targets = anchors_lib.assign_targets(grid, gt, classes, config)
    positive = class_targets.numpy() >= 0
    decoded = anchors_lib.decode(grid, box_targets).numpy()[positive]
    errors = np.abs(decoded[:, None, :] - gt[None, :3]).max(axis=-1)  # [positives, real boxes]
    assert errors.min(axis=1).max() < 1e-4
    assert set(errors.argmin(axis=1)) == {0, 1, 2}  # every box has a positive anchor
    # every positive anchor's class is the class of the box it decodes to
    np.testing.assert_array_equal(class_targets.numpy()[positive], classes[errors.argmin(axis=1)])


def test_assignment_thresholds_best_anchor_and_padding():
    anchors = np.array([[0, 0, 10, 10],      # IoU 1.00 with the big box: positive
                        [0, 0, 10, 18],      # 0.56: positive
                        [0, 0, 10, 22.5],    # 0.44: ignored
                        [0, 0, 10, 30],      # 0.33: background
                        [40, 40, 50, 50]],   # 0.04 with the tiny box, its best anchor: positive
                       np.float32)
    gt = np.array([[0, 0, 10, 10], [41, 41, 43, 43], [-1, -1, -1, -1]], np.float32)
    classes = np.array([3, 7, -1], np.int32)
    config = DetectionConfig()
    box_targets, class_targets = anchors_lib.assign_targets(anchors, gt, classes, config)
    np.testing.assert_array_equal(class_targets.numpy(), [3, 3, -2, -1, 7])
    np.testing.assert_allclose(box_targets.numpy()[0], 0.0, atol=1e-6)  # the box is the anchor
    np.testing.assert_array_equal(box_targets.numpy()[2:4], 0.0)  # nothing to regress off positives
    stricter = DetectionConfig(positive_iou=0.6, negative_iou=0.35)
    np.testing.assert_array_equal(anchors_lib.assign_targets(anchors, gt, classes, stricter)[1].numpy(),
                                  [3, -2, -2, -1, 7])
    # an image with only padding is all background
    empty = anchors_lib.assign_targets(anchors, -np.ones((2, 4), np.float32), -np.ones(2, np.int32), config)
    np.testing.assert_array_equal(empty[1].numpy(), [-1] * 5)

    # the same inside tf.data (graph mode), batched, through training_targets
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.zeros((2, 8, 8, 3), np.float32), {"boxes": np.stack([gt, -np.ones_like(gt)]),
                                              "classes": np.stack([classes, -np.ones_like(classes)])}))
    _, targets = next(iter(dataset.batch(2).map(anchors_lib.training_targets(anchors, config))))
    np.testing.assert_array_equal(targets["classes"].numpy(), [[3, 3, -2, -1, 7], [-1] * 5])
    assert targets["boxes"].shape == (2, 5, 5)
    np.testing.assert_array_equal(targets["boxes"][..., 4].numpy(), targets["classes"].numpy())
    np.testing.assert_allclose(targets["boxes"][0, :, :4].numpy(), box_targets.numpy(), atol=1e-6)


# ---------------------------------------------------------------- losses


def numpy_focal(labels, logits, alpha=0.25, gamma=2.0):
    targets = np.zeros_like(logits)
    for index in np.ndindex(labels.shape):
        if labels[index] >= 0:
            targets[index + (labels[index],)] = 1.0
    p = 1 / (1 + np.exp(-logits))
    p_t = np.where(targets == 1, p, 1 - p)
    alpha_t = np.where(targets == 1, alpha, 1 - alpha)
    terms = (-alpha_t * (1 - p_t) ** gamma * np.log(p_t)).sum(axis=-1)
    return np.where(labels == -2, 0.0, terms).sum() / max(1, (labels >= 0).sum())


def numpy_huber(labels, targets, predictions, delta=1.0):
    error = np.abs(predictions - targets)
    terms = np.where(error <= delta, 0.5 * error ** 2, delta * error - 0.5 * delta ** 2).sum(axis=-1)
    return np.where(labels >= 0, terms, 0.0).sum() / max(1, (labels >= 0).sum())


def test_focal_and_box_loss_match_numpy():
    # two images of 3 anchors: image 0 has one positive, a background and an ignored anchor
    labels = np.array([[1, -1, -2], [0, 1, -1]], np.int64)
    logits = np.array([[[0.3, -1.2], [2.0, -0.5], [5.0, 5.0]],
                       [[-3.0, 0.1], [0.0, 1.5], [-4.0, -2.0]]], np.float32)
    deltas = np.array([[[0.5, -0.2, 1.5, 0.1], [9, 9, 9, 9], [9, 9, 9, 9]],
                       [[0.0, 0.3, -2.5, 0.2], [1.0, 1.0, 1.0, 1.0], [9, 9, 9, 9]]], np.float32)
    predicted = np.array([[[0.1, 0.1, -0.2, 0.1], [0, 0, 0, 0], [0, 0, 0, 0]],
                          [[0.2, 0.3, 0.5, -0.4], [1.1, 0.9, 1.0, 3.0], [0, 0, 0, 0]]], np.float32)
    config = DetectionConfig(focal_alpha=0.25, focal_gamma=2.0, box_loss_weight=2.0)
    loss = losses.detection_losses(config)
    focal = float(loss["classes"](labels, logits))
    packed = np.concatenate([deltas, labels[..., None].astype(np.float32)], axis=-1)
    box = float(loss["boxes"](packed, predicted))
    assert focal == pytest.approx(numpy_focal(labels, logits.astype(np.float64)), rel=1e-5)
    assert box == pytest.approx(2.0 * numpy_huber(labels, deltas, predicted), rel=1e-5)
    assert numpy_focal(labels, logits) > 0 and numpy_huber(labels, deltas, predicted) > 1  # not trivial
    # no positives at all: normalized by 1, not 0
    none = np.full((1, 3), -1)
    assert float(loss["boxes"](np.concatenate([deltas[:1], none[..., None]], -1), predicted[:1])) == 0.0
    assert np.isfinite(float(loss["classes"](none, logits[:1])))


# ---------------------------------------------------------------- the detector


def random_batches(count: int, batch: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count * batch, SIZE, SIZE, 3)).astype(np.float32)
    boxes = -np.ones((count * batch, 4, 4), np.float32)
    classes = -np.ones((count * batch, 4), np.int32)
    for i in range(count * batch):
        for j in range(rng.integers(1, 4)):
            x, y = rng.uniform(0, 40, size=2)
            w, h = rng.uniform(8, 24, size=2)
            boxes[i, j] = [x, y, min(x + w, SIZE), min(y + h, SIZE)]
            classes[i, j] = rng.integers(num_classes)
    return tf.data.Dataset.from_tensor_slices((images, {"boxes": boxes, "classes": classes})).batch(batch)


# ResNet trains in a traced train step (the real path); MobileNetV2 eagerly, as tracing its 150 layers'
# gradient takes half a minute on a busy CPU
@pytest.mark.slow
@pytest.mark.parametrize("name, head, eager", [("resnet", "conv", False), ("mobilenet_v2", "depthwise", True)])
def test_detector_outputs_names_and_training(name, head, eager):
    import keras

    keras.utils.set_random_seed(0)
    config = DetectionConfig(strides=[8, 16, 32], fpn_channels=8, head=head, head_depth=1)
    num_classes = 3
    detector = model.build_detector(module(name), hparams(name), num_classes, SIZE, 3, config)
    shapes = model.feature_shapes(detector)
    assert shapes == {"stride_8": (8, 8), "stride_16": (4, 4), "stride_32": (2, 2)}
    anchors = model.model_anchors(detector, config)
    count = (64 + 16 + 4) * 9
    assert anchors.shape == (count, 4)
    assert {k: tuple(v.shape) for k, v in detector.output.items()} == {
        "boxes": (None, count, 4), "classes": (None, count, num_classes)}
    if head == "depthwise":
        assert isinstance(detector.get_layer("head_class_output"), keras.layers.SeparableConv2D)

    # the backbone inside keeps the classification model's layer names and weight shapes
    classifier = build_model(module(name), 10, (SIZE, SIZE, 3), hparams(name))
    theirs = {layer.name: [tuple(w.shape) for w in layer.weights] for layer in classifier.layers}
    ours = model.backbone_layer_names(detector)
    assert len(ours) > 20 and set(ours) == set(theirs) - {"avg_pool", "predictions"}
    for layer in ours:
        assert [tuple(w.shape) for w in detector.get_layer(layer).weights] == theirs[layer]

    # the prior: every anchor starts near probability 0.01
    images = np.zeros((1, SIZE, SIZE, 3), np.float32)
    start = tf.sigmoid(detector(images)["classes"]).numpy()
    assert 0.005 < start.mean() < 0.02

    data = random_batches(2, 2, num_classes).map(anchors_lib.training_targets(anchors, config))
    detector.compile(optimizer=keras.optimizers.Adam(3e-3), loss=losses.detection_losses(config),
                     run_eagerly=eager, jit_compile=False)
    assert built_before_fit(detector, data)  # as the runner: the loss trackers built now, the step traced once
    history = detector.fit(data, epochs=2 if eager else 4, verbose=0, shuffle=False).history
    assert all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < history["loss"][0]

    detections = postprocess.inference_model(detector, config)(images)
    assert detections["boxes"].shape == (1, config.max_detections, 4)
    assert detections["classes"].dtype == tf.int32


@pytest.mark.parametrize("name, levels, head_only", [
    # AlexNet at 64 px: 15, 7, 3, 1 px maps; the 1x1 (measured stride 64) is too far from 32 and dropped
    ("alexnet", {"stride_8": (7, 7), "stride_16": (3, 3)}, {"avg_pool", "flatten", "fc6_dropout", "fc6",
                                                           "fc7_dropout", "fc7", "predictions", "pool5"}),
    ("googlenet", {"stride_8": (8, 8), "stride_16": (4, 4), "stride_32": (2, 2)},
     {"avg_pool", "dropout", "predictions"}),
])
def test_detector_on_untidy_backbones(name, levels, head_only):
    config = DetectionConfig(fpn_channels=8, head_depth=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector = model.build_detector(module(name), hparams(name), 2, SIZE, 3, config)
    assert bool(caught) == (name == "alexnet")
    assert model.feature_shapes(detector) == levels
    count = sum(h * w for h, w in levels.values()) * 9
    assert detector.output["boxes"].shape == (None, count, 4)
    assert model.model_anchors(detector, config).shape == (count, 4)
    classifier = build_model(module(name), 10, (SIZE, SIZE, 3), hparams(name))
    assert set(model.backbone_layer_names(detector)) == {layer.name for layer in classifier.layers} - head_only


# ---------------------------------------------------------------- inference and metrics


def test_decode_detections_suppresses_the_duplicate():
    anchors = np.array([[10, 10, 30, 30], [11, 10, 31, 30], [40, 40, 60, 60], [-8, 50, 12, 70]], np.float32)
    logits = np.full((1, 4, 2), -10.0, np.float32)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 1] = 3.0, 2.0, 1.0, 0.5
    outputs = {"boxes": np.zeros((1, 4, 4), np.float32), "classes": logits}
    config = DetectionConfig(max_detections=5, nms_iou=0.5, score_threshold=0.05)
    result = postprocess.decode_detections(anchors, outputs, config, image_size=64)
    assert int(result["num_detections"][0]) == 3  # the overlapping second box of class 0 is gone
    np.testing.assert_allclose(result["boxes"][0, :3].numpy(), [[10, 10, 30, 30], [40, 40, 60, 60],
                                                                [0, 50, 12, 64]])  # clipped to 64 px
    np.testing.assert_array_equal(result["classes"][0].numpy(), [0, 1, 1, -1, -1])
    np.testing.assert_allclose(result["scores"][0, :3].numpy(), 1 / (1 + np.exp(-np.array([3.0, 1.0, 0.5]))),
                               rtol=1e-5)
    # the image size recovered from a real grid, and the decoder as a graph function
    grid = anchors_lib.anchor_grid({"a": (8, 8), "b": (4, 4)}, SIZE, DetectionConfig())
    assert float(postprocess.image_size_from_anchors(grid)) == pytest.approx(SIZE)
    traced = tf.function(lambda out: postprocess.decode_detections(anchors, out, config))
    assert int(traced(outputs)["num_detections"][0]) == 3


def test_coco_map_known_answers():
    names = ["cat", "dog", "bird"]
    truth = [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), np.array([0, 0])),
             (np.array([[5, 5, 25, 30], [-1, -1, -1, -1]]), np.array([1, -1]))]  # padded row
    perfect = [(b[c >= 0], c[c >= 0], np.full((c >= 0).sum(), 0.9)) for b, c in truth]
    result = metrics.coco_map(truth, perfect, names)
    assert result["mAP"] == pytest.approx(1.0) and result["mAP50"] == pytest.approx(1.0)
    assert result["per_class"]["bird"] == {"AP": None, "AP50": None}  # no ground truth

    # one of the two cats missed: recall stops at 0.5, so 51 of COCO's 101 recall points have precision 1
    half = [(np.array([[0, 0, 10, 10]]), np.array([0]), np.array([0.9])), perfect[1]]
    result = metrics.coco_map(truth, half, names)
    assert result["per_class"]["cat"]["AP"] == pytest.approx(51 / 101)
    assert result["per_class"]["dog"]["AP50"] == pytest.approx(1.0)
    assert result["mAP"] == pytest.approx((51 / 101 + 1) / 2)

    # a false dog scored above the true one halves the dog's precision at every recall
    cats = np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), np.array([0, 0]), np.array([0.9, 0.8])
    dog = (np.array([[5, 5, 25, 30], [60, 60, 70, 70]]), np.array([1, 1]), np.array([0.5, 0.7]))
    result = metrics.coco_map(truth, [cats, dog], names)
    assert result["per_class"]["dog"]["AP"] == pytest.approx(0.5)
    # a dog box at IoU 0.58 counts at the IoU thresholds .50 and .55 only, 2 of 10
    loose = (np.array([[5, 5, 25, 19.5]]), np.array([1]), np.array([0.9]))
    result = metrics.coco_map(truth, [cats, loose], names)
    assert result["per_class"]["dog"]["AP50"] == pytest.approx(1.0)
    assert result["per_class"]["dog"]["AP"] == pytest.approx(0.2)
    # the right box with the wrong class is no detection of the dog
    wrong = (np.array([[5, 5, 25, 30]]), np.array([2]), np.array([0.9]))
    result = metrics.coco_map(truth, [cats, wrong], names)
    assert result["per_class"]["dog"]["AP"] == 0.0 and result["per_class"]["bird"]["AP"] is None

    nothing = metrics.coco_map(truth, [(np.zeros((0, 4)), [], []), (np.zeros((0, 4)), [], [])], names)
    assert nothing["mAP"] == 0.0
