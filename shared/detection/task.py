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

from pathlib import Path

import tensorflow as tf

from shared import durable
from shared.config_schema import with_changes
from shared.detection import datasets as detection_data
from shared.detection.anchors import training_targets
from shared.detection.config import absolute_paths, check_detection_config, detection_augmentations
from shared.detection.evaluate import evaluate_detector, summary
from shared.detection.export import export_detection_saved_model
from shared.detection.gallery import GALLERY_FILE, plot_detections
from shared.detection.loop import DetectionLoop
from shared.detection.losses import detection_losses
from shared.detection import validation
from shared.detection.model import build_detector, head_layer_names, model_anchors
from shared.detection.starting_weights import initialize_backbone
from shared.detection import tflite
from shared.detection.tflite_inference import INFO_FILE
from shared.detection.validation import validation_split
from shared.detection.predict import Detector
from shared.errors import UserError
from shared.evaluate import check_class_names
from shared.task import Measure, Objective, Phase, Task, TaskData


# ---------------------------------------------------------------- the task


class DetectionTask(Task):
    name = "detection"
    commands = frozenset({"train", "resume", "test", "finetune", "finetune-all", "export", "loop", "predict", "size",
                          "tune"})
    distributes = True  # mirrored and multi-worker; check() refuses tpu
    measures = {"map": Measure("mAP", True), "map50": Measure("mAP50", True), "map75": Measure("mAP75", True)}
    tflite_options = {"raw_outputs": False, "nms": "regular"}
    onnx_file = "detector_raw.onnx"  # the raw box deltas and class logits per anchor, as the raw TFLite file

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

    @classmethod
    def open_predictor(cls, source, min_score):
        return Detector.for_source(source, min_score)

    def export_saved_model(self, model, run, export_dir, model_name, keep):
        return export_detection_saved_model(model, self.config, run, export_dir, model_name=model_name, keep=keep)

    def export_tflite(self, model, run, quantize, io, raw_outputs=False, nms="regular"):
        path = tflite.export_detection_tflite(model, self.config, run, quantize=quantize, io=io,
                                             raw_outputs=raw_outputs, nms=nms)
        if raw_outputs:
            return path, (f"with {path.parent / tflite.ANCHORS_FILE} and {path.parent / INFO_FILE} beside "
                          f"it (decode outside: shared.detection.tflite_inference.decode_tflite_outputs)")
        return path, (f"ending in {tflite.POSTPROCESS_OP} (outputs boxes, classes, scores, count), "
                      f"with {path.parent / tflite.LABELS_FILE} beside it")

    def evaluate_tflite(self, path, run):
        return tflite.evaluate_detection_tflite(path, self.config)

    def loop_support(self):
        return DetectionLoop()
