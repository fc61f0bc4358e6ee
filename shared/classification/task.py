"""`task: classification` (the default): a model module's build() -> class probabilities, trained with
cross-entropy (auxiliary heads weighted, label smoothing, MixUp / CutMix, distillation), measured by
top-1 / top-5, a confusion matrix (confusion.png), per-class F1 and the most confident mistakes (errors.png),
exported as a SavedModel or a TFLite file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow as tf

from shared import data as data_module
from shared import distill, durable, finetune, modelzoo, plots, runs
from shared.classification.loop import ClassificationLoop
from shared.classification.objective import objective, one_hot_targets
from shared.classification.predict import Predictor
from shared.config_schema import with_changes
from shared.class_names import readable
from shared.classification import export, tflite
from shared.classification.evaluate import ConfidentMistakes, evaluate_model, worst_classes
from shared.classification.views import VIEWS, view_maker, views_dataset
from shared.commands import ALL_COMMANDS
from shared.eval_view import resizes_pixels
from shared.evaluate import check_class_names
from shared.modelzoo import MAIN_OUTPUT
from shared.source_facts import SOURCES
from shared.task import Measure, Task, TaskData

MISTAKES_SHOWN = 16  # images in errors.png


def training_labels(dataset, outputs: list[str], one_hot_classes: int | None):
    """Labels as the compiled loss wants them: one-hot for label smoothing, and the same label for
    every auxiliary head (sample weights, when the examples carry them, pass through)."""
    if dataset is None:
        return None
    if one_hot_classes:
        dataset = dataset.map(lambda images, labels, *weights: (images, tf.one_hot(labels, one_hot_classes),
                                                                *weights))
    if outputs:
        dataset = dataset.map(lambda images, labels, *weights: (images, {name: labels for name in outputs},
                                                                *weights))
    return dataset


def summary(metrics: dict) -> str:
    """The test figures in one line."""
    loss = f"  loss {metrics['loss']:.4f}" if "loss" in metrics else ""
    return f"test top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}{loss}  ({metrics['examples']} images)"


def worst_classes_table(metrics: dict) -> str:
    """The worst classes by F1, a few lines ('' when the metrics have no per-class results)."""
    worst = worst_classes(metrics.get("per_class", []))
    if not worst:
        return ""
    width = min(max(len(entry["name"]) for entry in worst), 30)
    lines = [f"worst {len(worst)} classes by F1 (macro F1 {metrics['macro']['f1']:.4f} over "
             f"{metrics['macro']['classes']} classes):"]
    lines += [f"  {entry['name'][:width]:<{width}}  F1 {entry['f1']:.4f}  precision {entry['precision']:.4f}  "
              f"recall {entry['recall']:.4f}  ({entry['support']} images)" for entry in worst]
    return "\n".join(lines)


def _pixel_statistics(config) -> tuple[list[float] | None, list[float] | None]:
    """The per-channel mean and std (0-255 scale) that undo the pipeline's normalization, for showing images;
    (None, None) when unknown (each image is then stretched on its own)."""
    data = config.data if config is not None else None
    if data is None or (data.normalize and not (data.mean and data.std)):
        return None, None
    if not data.normalize:  # the pipeline divided by 255
        return [0.0] * data.channels, [255.0] * data.channels
    return list(data.mean), list(data.std)


def _test_files(datasets, examples: int, skipped: list[str] = ()) -> list[str] | None:
    """The files the test pass read, in its order, where the source has files: the test split's (data.limit_test
    cuts it) less the images data.on_corrupt: skip left out; None where that does not account for every example."""
    files = datasets.source.files.get("test") if datasets.source is not None else None
    left_out = set(skipped)
    read = [path for path in files[:datasets.num_test] if path not in left_out] if files else []
    return read if files and len(read) == examples else None


class ClassificationTask(Task):
    name = "classification"
    commands = ALL_COMMANDS
    distributes = True
    test_options = frozenset({"views"})
    test_views = tuple(VIEWS)
    measures = {"top1": Measure("top1", True), "top5": Measure("top5", True), "loss": Measure("loss", False),
                "val_loss": Measure(None, False)}

    def resolve(self):
        config = super().resolve()
        if not config.distill.teacher:
            return config
        teacher = str(runs.open_run(config.distill.teacher).path.resolve())  # the snapshot finds it from anywhere
        return with_changes(config, {"distill.teacher": teacher})

    def datasets(self, folder, replicas=1, start_epoch=0) -> TaskData:
        config = self.config
        # a run folder (test --run, resume) holds the split it recorded of a split-less image folder
        recorded = data_module.split.read(folder)
        datasets = data_module.make_datasets(config, modelzoo.load_augment_module(folder), replicas=replicas,
                                             start_epoch=start_epoch, recorded=recorded)

        def undecodable(error: BaseException) -> list[str]:  # name the files instead of showing TF's op trace
            return data_module.undecodable_files(error, datasets.source, config.data.max_pixels)

        return TaskData(train=datasets.train, val=datasets.val, steps_per_epoch=datasets.steps_per_epoch,
                        class_names=list(datasets.class_names), input_shape=tuple(datasets.input_shape),
                        description=f"{datasets.num_train} training / {datasets.num_val} validation / "
                                    f"{datasets.num_test} test images, {datasets.num_classes} classes",
                        details=datasets, undecodable=undecodable, records=datasets.source.record,
                        config=datasets.config)  # class count and statistics: the snapshot says what they were

    def build(self, module, input_shape):
        return modelzoo.build_model(module, self.config.data.num_classes, input_shape, self.config.model.hparams)

    @classmethod
    def import_weights(cls, source: str, path: Path, model_name: str, overrides: list[str],
                       argv: list[str] | None = None) -> runs.Run:
        from shared.classification.imported import import_run

        return import_run(cls, source, path, model_name, overrides, argv)

    def inference_model(self, model):
        return modelzoo.inference_model(model)  # auxiliary heads are for training only

    def initialize(self, model, module, data, source) -> str:
        config = self.config
        return finetune.initialize_from(config.init, model, module, config.model.hparams, data.input_shape,
                                        config.where, source)

    def trainer(self, model, data, teacher):
        """With distill.teacher set: the student wrapped with its frozen teacher (Hinton et al. 2015);
        checkpoints, evaluation and export see the student alone."""
        config = self.config
        if teacher is None:
            return model
        teacher = distill.load_teacher(teacher, data.details.num_classes, data.input_shape,
                                       normalization=distill.data_normalization(config.data),
                                       class_names=data.class_names)
        return distill.Distiller(model, teacher, config.distill.temperature, config.distill.alpha)

    def fit_data(self, model, module, data):
        datasets = data.details
        config = self.config
        outputs = _outputs(module, model)
        # labels the pipeline has not made one-hot already (mixed batches), where the loss wants them so
        one_hot = (datasets.num_classes if one_hot_targets(config.train) and not datasets.soft_labels
                   else None)
        train = datasets.train
        if datasets.class_weights is not None:  # training only: validation and test stay unweighted
            train = data_module.class_weights.with_sample_weights(train, datasets.class_weights,
                                                                  datasets.soft_labels)
        return training_labels(train, outputs, one_hot), training_labels(datasets.val, outputs, one_hot)

    def head_layer_names(self, module, model, input_shape):
        return finetune.head_layer_names(module, model, self.config.model.hparams, input_shape)

    def objective(self, model, module, data):
        datasets = data.details
        return objective(self.config.train, datasets.num_classes, modelzoo.auxiliary_loss_weights(module, model),
                         soft_labels=datasets.soft_labels)

    def evaluate(self, model, data):
        config = self.config
        datasets = data.details
        mistakes = ConfidentMistakes(MISTAKES_SHOWN)
        metrics = evaluate_model(model, datasets.test, datasets.num_classes, data.class_names, mistakes)
        metrics["views"] = "center"  # the run's eval view (`test --views` names others)
        skipped = data_module.skipped_images(datasets.skips) if datasets.skips is not None else {}
        metrics.update({f"skipped_{split}_images": len(names) for split, names in skipped.items()})

        def draw(folder: Path) -> None:
            if "train" in skipped:  # after training: the run records what it left out
                data_module.write_skipped(folder, skipped, config.data.max_pixels)
            names = readable(data.class_names)
            with durable.disk_space_checked(folder / "confusion.png"):
                plots.plot_confusion(metrics["confusion"], names, folder / "confusion.png")
            with durable.disk_space_checked(folder / "errors.png"):
                plots.plot_errors(mistakes.images if mistakes.images is not None else [],
                                  [names[i] for i in mistakes.labels], [names[i] for i in mistakes.predicted],
                                  mistakes.scores, folder / "errors.png", *_pixel_statistics(datasets.config),
                                  sources=mistakes.sources(_test_files(datasets, metrics["examples"],
                                                                       skipped.get("test", ()))))

        return metrics, draw

    def test_data(self, run) -> TaskData:
        config = self.config
        if not SOURCES[config.data.source].classes_from_config:  # synthetic: as many as data.num_classes asks
            # the data's own classes, compared with the run's before the model loads
            config = with_changes(config, {"data.num_classes": None})
        data = self.bound(config).datasets(run.path)
        check_class_names(data.class_names, run)
        return data

    def with_views(self, data, views):
        datasets, config = data.details, data.details.config
        raw = datasets.source.test.take(config.data.limit_test) if config.data.limit_test else datasets.source.test
        read = tf.io.read_file if datasets.source.encoding == "path" else (lambda image: image)
        normalize = data_module.preprocess.normalizer(config.data.mean, config.data.std, config.data.normalize,
                                                      config.data.image_size)
        skip = config.data.on_corrupt == "skip" and datasets.source.encoding is not None  # as the plain test split
        test = views_dataset(raw, view_maker(views, config, resizes_pixels(config)), normalize, read,
                             config.train.batch_size, skip_undecodable=skip)
        return dataclasses.replace(data, details=dataclasses.replace(datasets, test=test))

    @classmethod
    def summary(cls, metrics):
        return summary(metrics)

    @classmethod
    def details(cls, metrics):
        return worst_classes_table(metrics)

    @classmethod
    def open_predictor(cls, source, min_score):
        return Predictor.for_source(source, min_score)

    def export_saved_model(self, model, run, export_dir, model_name, keep):
        return export.export_saved_model(model, self.config, run, export_dir, model_name=model_name, keep=keep)

    def export_tflite(self, model, run, quantize, io, **options):
        return tflite.convert(model, self.config, run, quantize=quantize, io=io), ""

    def onnx_metadata(self, run):
        import json

        from shared.eval_view import EvalView

        # the eval view exactly as the TFLite file and the SavedModel record it (crop or resize, statistics)
        return {**super().onnx_metadata(run), "preprocessing": json.dumps(EvalView.from_config(self.config).record())}

    def evaluate_tflite(self, path, run):
        return tflite.evaluate_tflite(path, run, self.config)

    def loop_support(self):
        return ClassificationLoop()


def _outputs(module, model) -> list[str]:
    aux_weights = modelzoo.auxiliary_loss_weights(module, model)
    return [MAIN_OUTPUT, *aux_weights] if aux_weights else []


