"""The rules of `task: detection` over the config: the checks that involve several keys (the schema checks
each key alone), data.augment as the entries the pipeline takes, and the detection keys naming files made
absolute.
"""

from __future__ import annotations

import os

from shared.config_schema import Config, with_changes
from shared.detection import augment as detection_augment
from shared.detection import validation
from shared.errors import UserError
from shared.task import absolute

UNSUPPORTED_STRATEGIES = ("tpu",)  # TPUs need static batch shapes; the last detection batch may be partial


def check_detection_config(config: Config) -> None:
    """The rules of `task: detection` that involve several keys; the schema checks the rest."""
    where = config.where
    if config.task != "detection":
        raise UserError(f"task is {config.task!r}{where}; the detection runner needs task: detection")
    if config.detection.negative_iou > config.detection.positive_iou:
        raise UserError(f"detection.negative_iou {config.detection.negative_iou} is above detection.positive_iou "
                        f"{config.detection.positive_iou}{where}; keep negative_iou <= positive_iou")
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
