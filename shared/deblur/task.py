"""`task: deblur`: a residual restoration network on a classification backbone (shared/deblur/model.py),
trained on (blurred, sharp) pairs blurred on the fly (shared/deblur/data.py, shared/data/blur.py),
measured by PSNR / SSIM against the blurred input and drawn in deblur.png (shared/deblur/evaluate.py),
exported as a SavedModel (image bytes in, restored image out) or a TFLite file (shared/deblur/export.py).
`evaluate_with_classifier` asks a classification run what it makes of sharp, blurred and restored images."""

from __future__ import annotations

from pathlib import Path

import keras

from shared import config as config_module
from shared import data as data_module
from shared import durable, finetune, modelzoo, runs
from shared.data import blur
from shared.deblur import evaluate as deblur_evaluate
from shared.deblur import export
from shared.deblur.data import make_pairs
from shared.deblur.model import build_restorer, head_layer_names
from shared.errors import UserError
from shared.evaluate import check_class_names
from shared.frozen import thaw
from shared.task import Objective, Rebuilt, Task, TaskData


class DeblurTask(Task):
    name = "deblur"
    commands = frozenset({"train", "resume", "test", "finetune", "finetune-all", "export", "size"})
    distributes = False
    test_options = frozenset({"classifier"})
    onnx_file = "restorer.onnx"

    def check(self) -> None:
        config = self.config
        if config.data.batch_augment:
            raise UserError(f"data.batch_augment{config.where} mixes images of a batch; a deblurring run "
                            f"restores each image as it is: remove it")
        # names, arguments and kernel sizes, before a folder exists
        blur.build(config.deblur.blur, config.data.image_size, seed=config.train.seed)

    def datasets(self, folder, replicas=1, start_epoch=0) -> TaskData:
        config = self.config
        pairs = make_pairs(config, modelzoo.load_augment_module(folder), replicas=replicas, start_epoch=start_epoch)
        datasets = pairs.datasets

        def undecodable(error: BaseException) -> list[str]:
            return data_module.undecodable_files(error, datasets.source, config.data.max_pixels)

        return TaskData(train=pairs.train, val=pairs.val, steps_per_epoch=datasets.steps_per_epoch,
                        class_names=list(datasets.class_names), input_shape=tuple(datasets.input_shape),
                        description=f"{datasets.num_train} training / {datasets.num_val} validation / "
                                    f"{datasets.num_test} test images, blur {thaw(config.deblur.blur)}",
                        details=pairs, undecodable=undecodable, config=pairs.datasets.config)

    def build(self, module, input_shape):
        return build_restorer(module, self.config.model.hparams, input_shape[0], input_shape[-1],
                              self.config.deblur.decoder_channels)

    def initialize(self, model, module, data, source) -> str:
        config = self.config
        # The classification rule fits: every backbone layer from the source, the decoder (the layers the
        # model's backbone() does not have) freshly initialized unless the source has them alike.
        return finetune.initialize_from(config.init, model, module, config.model.hparams, data.input_shape,
                                        config.where, source)

    def head_layer_names(self, module, model, input_shape):
        return head_layer_names(model)

    def objective(self, model, module, data):
        config = self.config
        loss = keras.losses.MeanAbsoluteError() if config.deblur.loss == "l1" else keras.losses.MeanSquaredError()
        return Objective(loss, metrics=[deblur_evaluate.psnr_metric(config)])

    def evaluate(self, model, data):
        metrics, gallery = deblur_evaluate.evaluate_restorer(model, data.details.test, self.config)

        def draw(folder: Path) -> None:
            with durable.disk_space_checked(folder / deblur_evaluate.FIGURE_FILE):
                deblur_evaluate.plot_gallery(gallery, folder / deblur_evaluate.FIGURE_FILE)

        return metrics, draw

    def test_data(self, run) -> TaskData:
        data = self.datasets(run.path)
        check_class_names(data.class_names, run)
        return data

    @classmethod
    def summary(cls, metrics):
        return deblur_evaluate.summary(metrics)

    @classmethod
    def open_predictor(cls, source, min_score):
        raise UserError(f"predict does not run {cls.name} models ({source}): it lists the classes or boxes of "
                        f"a classification or detection run, SavedModel or TFLite file")

    def export_saved_model(self, model, run, export_dir, model_name, keep):
        return export.export_saved_model(model, self.config, run, export_dir, model_name=model_name, keep=keep)

    def export_tflite(self, model, run, quantize, io, **options):
        return export.convert_tflite(model, self.config, run, quantize=quantize, io=io), ""

    def evaluate_tflite(self, path, run):
        return export.evaluate_tflite(path, self.test_data(run).details.test, self.config)

    def test_with_classifier(self, model, run, classifier):
        return evaluate_with_classifier(model, run, classifier)


def evaluate_with_classifier(restorer, run: runs.Run, classifier: Rebuilt) -> dict:
    """`test --run DEBLUR_RUN --classifier CLASSIFICATION_RUN`: the deblurring run's test figures (as
    `test --run`, of `restorer`, the run's model rebuilt) plus metrics["classifier"]: the rebuilt `classifier`'s
    top-1 on the sharp, blurred and restored test images, and the share of the top-1 lost to blur that restoring
    recovers. Written to the deblurring run's classifier_metrics.json (the run's own test_metrics.json stays as
    training wrote it)."""
    classifier_run, classifier_model, classifier_config = classifier.run, classifier.model, classifier.config
    config = config_module.from_dict(run.config_dict())
    if config.task != "deblur":
        raise UserError(f"run {run.path} is a {config.task} run; --classifier needs a deblurring run (task: deblur)")
    task = DeblurTask(config)
    data = task.test_data(run)
    deblur_evaluate.check_classifier(classifier_config, config, classifier_run.class_names(), data.class_names,
                                     f"--classifier {classifier_run.path}")
    metrics, draw = task.evaluate(restorer, data)
    draw(run.path)
    metrics["classifier"] = {"run": str(classifier_run.path.resolve()),
                             **deblur_evaluate.classifier_top1(classifier_model, classifier_config, restorer,
                                                               data.details.test, config)}
    run.write_json("classifier_metrics.json", metrics["classifier"])
    return metrics
