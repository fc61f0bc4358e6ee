"""`task: detection`: config -> detection data -> detector on the model's backbone -> COCO mAP on the test
split, trained through the one run lifecycle (`shared.lifecycle`: run folder, callbacks, status, phases).

    python -m shared.runner --config models/resnet/detect.yaml
    python -m shared.runner --config models/resnet/detect.yaml --set init.from_run=runs/resnet/v0001
    python -m shared.runner test --run runs/resnet/v0002        # re-test a detection run from its snapshot

Before the run folder exists everything is checked: the config's detection keys, the annotations and image
files (`load_detection_data`), the backbone's strides (`build_detector`), the augmentation names and the
starting weights, which must fit the backbone (`init.from_run` / `init.weights`).

Starting weights: `init.from_run` names a classification run (its model is rebuilt from its own snapshotted
model.py and config.yaml with its last checkpoint, `finetune.source_from_run`) or a detection run (its
detector, likewise); `init.weights` a weight file (`finetune.source_from_file`). Layers are copied by name:
the detector's backbone keeps the classification model's layer names, so every backbone layer must be
there with the same shapes, or the run stops with a UserError naming the layers and the differing
hyperparameters. The pyramid and head layers (`fpn_*`, `head_*`) are copied only from a detection run whose
shapes agree; otherwise they keep their fresh initialization.

Freezing: `train.freeze: [backbone]` freezes every layer but the pyramid and heads (fnmatch patterns of
layer names work too); `detection.unfreeze_epoch: N` trains the first N epochs so, then every layer from
epoch N + 1 on (a second `fit` with a recompiled optimizer; epochs, checkpoints and metrics.csv rows are
counted through). `init.mode: finetune_all` (`finetune-all --from RUN`) works as in classification:
`init.head_epochs` with the backbone frozen, then every layer at `init.lr_scale` times the rate.

Data augmentation: `data.augment` lists the box-aware augmentations of `shared.detection.augment`
(ssd_crop, expand, flip, zoom, translate, color_jitter); an empty list trains on the images as they are.

After training the last checkpoint is evaluated on the test split: `test_metrics.json` holds COCO mAP
(AP@[.5:.95]), mAP50, mAP75 and per-class APs (`metrics.coco_map`, on boxes in the resized image: IoU does
not change when x and y are scaled), `detections.png` a gallery of test images with the predicted boxes
(class and score) over the ground truth (dashed), `curves.png` the losses and learning rate per epoch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from shared import durable, finetune, plots, runs
from shared.config import Config, with_changes
from shared.detection import datasets as detection_data
from shared.detection.anchors import training_targets
from shared.detection.export import box_iou, ground_truth
from shared.detection.losses import detection_losses
from shared.detection import validation
from shared.detection.metrics import detection_map
from shared.detection.model import HEAD_PREFIXES, OUTPUT_NAMES, build_detector, model_anchors
from shared.detection.postprocess import decode_detections
from shared.errors import UserError
from shared.evaluate import check_class_names
from shared.task import Measure, Objective, Phase, Rebuilt, Task, TaskData, absolute

GALLERY_FILE = "detections.png"
GALLERY_IMAGES = 16  # test images drawn in detections.png
GALLERY_COLUMNS = 4
GALLERY_MIN_SCORE = 0.3  # predictions drawn from this score up (all of them count in the mAP)
GALLERY_MAX_BOXES = 10  # predictions drawn per image, best first
GALLERY_OVERLAP = 0.5  # a prediction overlapping a better drawn one more than this (any class) is not drawn
UNSUPPORTED_STRATEGIES = ("tpu",)  # TPUs need static batch shapes; the last detection batch may be partial


# ---------------------------------------------------------------- checks


def check_detection_config(config: Config) -> None:
    """The rules of `task: detection` that involve several keys; the schema checks the rest."""
    where = config.where
    if config.task != "detection":
        raise UserError(f"task is {config.task!r}{where}; the detection runner needs task: detection")
    if config.data.val_fraction and not config.detection.eval_every:
        raise UserError(f"data.val_fraction{where} holds images out for detection.eval_every's validation mAP, "
                        f"which is not set; set detection.eval_every (e.g. 1) or data.val_fraction 0")
    logged = validation.logged_keys(config.detection.eval_protocol) if config.detection.eval_every else set()
    for key, monitor in (("train.best.monitor", config.train.best.monitor),
                         ("train.early_stopping.monitor", config.train.early_stopping.monitor)):
        if monitor and monitor.startswith("val_map") and monitor not in logged:
            raise UserError(f"{key} is {monitor!r}{where}, which this run will not log; validation mAP needs "
                            f"detection.eval_every, and logs {', '.join(sorted(validation.logged_keys('coco')))} "
                            f"(coco) or {', '.join(sorted(validation.logged_keys('voc')))} (voc)")
    if config.distill.teacher:
        raise UserError(f"distill.teacher{where}: distillation is for classification; remove it for task: "
                        f"detection")
    if config.distribute.strategy in UNSUPPORTED_STRATEGIES:
        raise UserError(f"distribute.strategy {config.distribute.strategy}{where} is not supported for task: "
                        f"detection yet; use auto, one_device, mirrored or multi_worker")
    if config.data.batch_augment:
        raise UserError(f"data.batch_augment{where} (MixUp / CutMix) is for classification; remove it for "
                        f"task: detection")
    detection_augmentations(config)
    if not config.detection.test_annotations:
        raise UserError(f"detection.test_annotations{where} is empty; the detection runner evaluates on a test "
                        f"split after training: name its annotations")
    unfreeze, epochs = config.detection.unfreeze_epoch, config.train.epochs
    if unfreeze is not None:
        if not config.train.freeze:
            raise UserError(f"detection.unfreeze_epoch {unfreeze}{where} needs train.freeze (e.g. [backbone]): "
                            f"there is nothing to unfreeze")
        if not 1 <= unfreeze < epochs:
            raise UserError(f"detection.unfreeze_epoch is {unfreeze}{where}; it must be in [1, train.epochs = "
                            f"{epochs}): the epochs trained frozen before every layer trains")
        if config.init.mode == "finetune_all":
            raise UserError(f"detection.unfreeze_epoch and init.mode finetune_all{where} both plan the frozen "
                            f"epochs; use one (init.head_epochs with finetune_all)")


def detection_augmentations(config: Config) -> list:
    """data.augment as the entries `make_dataset` takes, each name and argument checked
    (`shared.detection.augment`)."""
    from shared.detection import augment as detection_augment

    entries = list(config.data.augment)
    detection_augment.build(entries, config.data.channels, [0.0] * config.data.channels, where=config.where)
    return entries


def absolute_paths(config: Config) -> Config:
    """The detection keys that name files, made absolute (Task.resolve does the common ones)."""
    detection = config.detection
    changes = {"detection.label_map": absolute(detection.label_map)}
    for key in ("train_annotations", "test_annotations"):
        value = getattr(detection, key)
        # VOC's are image-set names unless they are files
        if value and (detection.format != "voc" or os.path.exists(os.path.expanduser(value))):
            changes[f"detection.{key}"] = absolute(value)
    return with_changes(config, changes)


def validation_split(train: detection_data.DetectionSplit, config: Config,
                     test: detection_data.DetectionSplit | None
                     ) -> tuple[detection_data.DetectionSplit, detection_data.DetectionSplit | None]:
    """(training split, the split detection.eval_every evaluates): data.val_fraction of the training images
    held out (drawn with train.seed, the same on every resume), else the test split itself (then the
    validation mAP, and a best checkpoint picked by it, have seen the test images). None without eval_every."""
    fraction = config.data.val_fraction
    if not config.detection.eval_every:
        return train, None
    if not fraction:
        return train, test
    count = max(1, round(len(train) * fraction))
    if count >= len(train):
        raise UserError(f"data.val_fraction {fraction}{config.where} leaves no training image of {len(train)}; "
                        f"lower it")
    held = set(np.random.default_rng(config.train.seed).permutation(len(train))[:count].tolist())
    kept = [record for i, record in enumerate(train) if i not in held]
    chosen = [record for i, record in enumerate(train) if i in held]
    return (detection_data.DetectionSplit(kept, train.class_names, train.source),
            detection_data.DetectionSplit(chosen, train.class_names, f"{train.source} (validation)"))


# ---------------------------------------------------------------- starting weights


def head_layer_names(detector: keras.Model) -> set[str]:
    """The layers the detector adds to the backbone: fpn_*, head_* and the two outputs."""
    return {layer.name for layer in detector.layers
            if layer.name.startswith(HEAD_PREFIXES) or layer.name in OUTPUT_NAMES}


def _normalization_note(source_run: runs.Run | None, config: Config) -> str:
    """A remark when the source run normalized its inputs otherwise than this run does: its backbone then
    sees inputs on another scale than the one it learned."""
    if source_run is None:
        return ""
    recorded = source_run.config_dict().get("data", {})
    if recorded.get("normalize", True) and (recorded.get("mean") is None or recorded.get("std") is None):
        return ""  # not recorded (the source's own statistics): nothing to compare
    mean, std = detection_data.detection_normalization(config)
    if recorded.get("normalize", True) == config.data.normalize and recorded.get("mean") == mean \
            and recorded.get("std") == std:
        return ""
    return (f" (note: it normalized its inputs with mean {recorded.get('mean')} std {recorded.get('std')}, this "
            f"run with mean {mean} std {std}; set data.mean / data.std to match)")


def initialize_backbone(config: Config, detector: keras.Model, module, source: Rebuilt | None) -> str:
    """Copy init.from_run's (or init.weights') layers into `detector` by name (`source`: that run, rebuilt;
    None for a weight file of no run); returns the line for the run's notes. Every backbone layer must be in
    the source with the same shapes (else a UserError naming them and the differing hyperparameters);
    pyramid and head layers are copied where the source has them shaped alike (a detection run), else they
    keep their fresh initialization."""
    init, data, where = config.init, config.data, config.where
    input_shape = (data.image_size, data.image_size, data.channels)
    hparams = config.model.hparams
    key = f"init.from_run {init.from_run}" if init.from_run else f"init.weights {init.weights}"
    source_run = source.run if source is not None and init.from_run else None  # a classification or detection run
    with finetune.named_init(init, where):
        source = finetune.source_model(init, module, hparams, input_shape, source)
    head = head_layer_names(detector)
    matching = finetune.match_layers(source.model, detector, head)
    if matching.conflicts:
        raise UserError(f"{key}{where} does not fit this detector's backbone: {finetune.listed(matching.conflicts)}; "
                        f"{finetune.fix_suggestion(source, hparams, input_shape)}")
    finetune.copy_weights(source.model, detector, matching.copied)
    backbone = [name for name in matching.copied if name not in head]
    copied_head = [name for name in matching.copied if name in head]
    line = f"backbone weights from {source.description}: {len(backbone)} layers copied by name; "
    if copied_head:
        line += (f"pyramid and heads: {len(copied_head)} layers copied, {len(matching.reinitialized)} freshly "
                 f"initialized ({finetune.listed(matching.reinitialized, 3) or 'none'})")
    else:
        line += f"pyramid and heads freshly initialized ({len(matching.reinitialized)} layers)"
    return line + _normalization_note(source_run, config)


# ---------------------------------------------------------------- evaluation


def _unnormalize(images: np.ndarray, config: Config) -> np.ndarray:
    """Pipeline images back to 0-255 pixels, for drawing."""
    data = config.data
    if not data.normalize:
        return np.clip(images * 255.0, 0, 255)
    mean, std = detection_data.detection_normalization(config)
    return np.clip(images * np.asarray(std, np.float32) + np.asarray(mean, np.float32), 0, 255)


def evaluate_detector(detector: keras.Model, split: detection_data.DetectionSplit, config: Config,
                      class_names: list[str], gallery: int = GALLERY_IMAGES) -> tuple[dict, dict]:
    """COCO mAP of `detector` on `split` through the evaluation pipeline and decode_detections (NMS with
    config.detection's thresholds). Returns (metrics, gallery data: the first `gallery` images as 0-255
    pixels with their detections and ground truth)."""
    size = config.data.image_size
    anchors = model_anchors(detector, config.detection)

    @tf.function(reduce_retracing=True, autograph=False)  # no Python control flow to convert
    def predict(images):
        return decode_detections(anchors, detector(images, training=False), config.detection, size)

    detections, shown = [], []
    for images, _ in detection_data.make_dataset(split, config, training=False):
        found = {key: value.numpy() for key, value in predict(images).items()}
        for i, count in enumerate(found["num_detections"]):
            detections.append((found["boxes"][i, :count], found["classes"][i, :count], found["scores"][i, :count]))
        if sum(map(len, shown)) < gallery:
            shown.append(_unnormalize(images.numpy(), config))
    truth = evaluation_truth(split, size)
    metrics = detection_map(config.detection.eval_protocol, truth, detections, class_names,
                            config.detection.max_detections)
    metrics.update(examples=len(split), boxes=split.num_boxes,
                   detections=int(sum(len(classes) for _, classes, _ in detections)))
    images = np.concatenate(shown)[:gallery] if shown else np.zeros((0, size, size, config.data.channels))
    return metrics, {"images": images, "detections": detections[:len(images)],
                     "truth": [entry[:2] for entry in truth[:len(images)]]}


def evaluation_truth(split: detection_data.DetectionSplit, image_size: int) -> list[tuple]:
    """(boxes in the resized image's pixels, classes, VOC difficult flags) per image: the ground truth the
    protocols score against (the voc protocol ignores the difficult boxes, coco counts them)."""
    return [(boxes, classes, record.difficult) for (boxes, classes), record in zip(ground_truth(split, image_size),
                                                                                     split)]


def _shown(boxes: np.ndarray, scores: np.ndarray, min_score: float) -> list[int]:
    """The predictions drawn: from `min_score` up, best first, at most GALLERY_MAX_BOXES, and none that
    overlaps a better drawn one by IoU > GALLERY_OVERLAP whatever its class (NMS is per class, so one object
    may carry several class hypotheses; the picture shows the best)."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < min_score or len(kept) == GALLERY_MAX_BOXES:
            break
        if not kept or not (box_iou(boxes[i], boxes[kept]) > GALLERY_OVERLAP).any():
            kept.append(int(i))
    return kept


def detections_figure(images: np.ndarray, detections: list, truth: list, class_names: list[str],
                      columns: int = GALLERY_COLUMNS, min_score: float = GALLERY_MIN_SCORE):
    """A grid of images (0-255 pixels [N, S, S, C]) with the ground-truth boxes dashed white and the
    predictions scoring at least `min_score` (see `_shown`) in their class's colour, labelled with class and
    score."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(2.6 * columns, 2.8 * rows), dpi=plots.DPI, layout="constrained")
    palette = list(colormaps["tab10"].colors)
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if index >= count:
            continue
        image = images[index] / 255.0
        if image.shape[-1] == 1:
            axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axes.imshow(image, interpolation="nearest")
        gt_boxes, gt_classes = truth[index]
        for box in gt_boxes:
            axes.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                     edgecolor="white", linestyle="--", linewidth=1.0))
        boxes, classes, scores = detections[index]
        keep = _shown(np.asarray(boxes), np.asarray(scores), min_score)
        for i in keep:
            box, cls = boxes[i], int(classes[i])
            colour = palette[cls % len(palette)]
            axes.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                     edgecolor=colour, linewidth=1.5))
            name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
            axes.text(box[0], box[1], f"{name} {scores[i]:.2f}", color="black", fontsize=6, va="bottom",
                      bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0})
        axes.set_title(f"{len(keep)} found (>= {min_score:g}) / {len(gt_classes)} true", fontsize=7)
    return figure


def plot_detections(gallery: dict, class_names: list[str], out_png: Path) -> Path | None:
    """The gallery of `evaluate_detector` as a PNG, written atomically (None when there is no image)."""
    if not len(gallery["images"]):
        return None
    figure = detections_figure(gallery["images"], gallery["detections"], gallery["truth"], class_names)
    return plots.save_figure(figure, out_png)


def summary(metrics: dict) -> str:
    def fmt(value):
        return f"{value:.4f}" if isinstance(value, float) else "n/a"

    counts = f"({metrics.get('examples')} images, {metrics.get('boxes')} boxes)"
    if metrics.get("protocol") == "voc":
        return f"test VOC mAP@.5 {fmt(metrics.get('mAP50'))}, difficult boxes ignored  {counts}"
    return (f"test COCO mAP@[.5:.95] {fmt(metrics.get('mAP'))}  mAP@.5 {fmt(metrics.get('mAP50'))}  "
            f"mAP@.75 {fmt(metrics.get('mAP75'))}  {counts}")


# ---------------------------------------------------------------- the task


class DetectionTask(Task):
    name = "detection"
    commands = frozenset({"train", "resume", "test", "finetune", "finetune-all", "export", "loop", "predict", "size",
                          "tune"})
    distributes = True  # mirrored and multi-worker; check() refuses tpu
    measures = {"map": Measure("mAP", True), "map50": Measure("mAP50", True), "map75": Measure("mAP75", True)}
    tflite_options = {"raw_outputs": False, "nms": "regular"}

    def check(self) -> None:
        check_detection_config(self.config)

    def resolve(self):
        return absolute_paths(super().resolve())

    def plan_phases(self) -> list[Phase]:
        """train.freeze with detection.unfreeze_epoch N: N epochs frozen, then every layer; otherwise the
        common plan (one phase, or finetune_all's head-only warm start)."""
        config = self.config
        unfreeze = config.detection.unfreeze_epoch
        if unfreeze is None:
            return super().plan_phases()
        return [Phase(unfreeze, list(config.train.freeze)), Phase(config.train.epochs, [])]

    def datasets(self, folder, replicas=1, start_epoch=0) -> TaskData:
        config = self.config
        train_split, test_split, class_names = detection_data.load_detection_data(config)
        train_split, val_split = validation_split(train_split, config, test_split)
        if config.data.num_classes is not None and config.data.num_classes != len(class_names):
            raise UserError(f"data.num_classes is {config.data.num_classes}{config.where} but the annotations "
                            f"{train_split.source} have {len(class_names)} classes; remove data.num_classes")
        mean, std = detection_data.detection_normalization(config)  # as for classification, recorded
        config = with_changes(config, {"data.num_classes": len(class_names),  # the snapshot says how many
                                       "data.mean": mean, "data.std": std})
        data = config.data
        # train.batch_size is per replica: the pipeline yields the global batch, Keras splits it
        global_batch = config.train.batch_size * replicas
        train = detection_data.make_dataset(train_split, config, training=True,
                                            augment=detection_augmentations(config), repeat=True,
                                            batch_size=global_batch)
        steps = detection_data.steps_per_epoch(train_split, with_changes(config, {"train.batch_size": global_batch}))
        held_out = f"{len(val_split)} validation / " if val_split is not None and val_split is not test_split else ""
        # val: the DetectionSplit detection.eval_every evaluates (`callbacks`), not a pipeline fit() validates on
        return TaskData(train=train, val=val_split, steps_per_epoch=steps,
                        class_names=list(class_names), input_shape=(data.image_size, data.image_size, data.channels),
                        description=f"{len(train_split)} training / {held_out}{len(test_split)} test images, "
                                    f"{len(class_names)} classes", details=test_split, config=config)

    def callbacks(self, model, data):
        """detection.eval_every: the validation mAP callback (`shared.detection.validation`)."""
        config = self.config
        every = config.detection.eval_every
        if not every or data.val is None:
            return []

        def evaluate() -> dict:
            return evaluate_detector(model, data.val, config, data.class_names, gallery=0)[0]

        return [validation.ValidationMAP(evaluate, every, config.train.epochs, config.detection.eval_protocol)]

    def build(self, module, input_shape):
        config = self.config
        return build_detector(module, config.model.hparams, config.data.num_classes, input_shape[0], input_shape[-1],
                              config.detection)

    def initialize(self, model, module, data, source) -> str:
        return initialize_backbone(self.config, model, module, source)

    def fit_data(self, model, module, data):
        detection = self.config.detection
        anchors = model_anchors(model, detection)
        return data.train.map(training_targets(anchors, detection), num_parallel_calls=tf.data.AUTOTUNE), None

    def head_layer_names(self, module, model, input_shape):
        return head_layer_names(model)

    def objective(self, model, module, data):
        return Objective(detection_losses(self.config.detection))

    def evaluate(self, model, data):
        metrics, gallery = evaluate_detector(model, data.details, self.config, data.class_names)

        def draw(folder: Path) -> None:
            with durable.disk_space_checked(folder / GALLERY_FILE):
                plot_detections(gallery, data.class_names, folder / GALLERY_FILE)

        return metrics, draw

    def test_data(self, run) -> TaskData:
        config = self.config
        _, test, class_names = detection_data.load_detection_data(config)
        check_class_names(class_names, run)  # the annotations may have changed since
        data = config.data
        return TaskData(train=None, val=None, steps_per_epoch=0, class_names=list(class_names),
                        input_shape=(data.image_size, data.image_size, data.channels),
                        description=f"{len(test)} test images", details=test)

    @classmethod
    def summary(cls, metrics):
        return summary(metrics)

    def export_saved_model(self, model, run, export_dir, model_name, keep):
        from shared.detection import export

        return export.export_detection_saved_model(run, export_dir, model_name=model_name, keep=keep)

    def export_tflite(self, model, run, quantize, io, raw_outputs=False, nms="regular"):
        from shared.detection import export

        path = export.export_detection_tflite(run, quantize=quantize, io=io, raw_outputs=raw_outputs, nms=nms)
        if raw_outputs:
            return path, (f"with {path.parent / export.ANCHORS_FILE} and {path.parent / export.INFO_FILE} beside "
                          f"it (decode outside: shared.detection.export.decode_tflite_outputs)")
        return path, (f"ending in {export.POSTPROCESS_OP} (outputs boxes, classes, scores, count), "
                      f"with {path.parent / export.LABELS_FILE} beside it")

    def evaluate_tflite(self, path, run):
        from shared.detection import export

        return export.evaluate_detection_tflite(path, run)
