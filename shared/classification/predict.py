"""Classify images with what a classification run trained: the run's model (rebuilt from its snapshot and a
checkpoint), its SavedModel export or its .tflite file, each with the run's own eval preprocessing
(`shared.eval_view`); the classification side of `shared.predict`, which reads the inputs.

    from shared.classification.predict import Predictor
    from shared.tasks import rebuild
    run = open_run("runs/resnet/v0001")
    Predictor.from_run(run, *rebuild(run)).predict(["a.jpg"], top_k=5)

A result is a `Prediction`: an input's top-k classes, or why it was skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from shared import config as config_module
from shared.class_names import readable
from shared.errors import UserError
from shared.eval_view import EvalView
from shared.predict import ImagePredictor, Source, export_record, first_line, owning_run, saved_model_folder
from shared.runs import Run, open_run, require_idle
from shared.tflite import load_interpreter, predict_tflite


@dataclass
class Prediction:
    """One input's top-k classes, best first; `error` (and empty lists) when it was skipped."""
    input: str | int  # the path, or the array's position among the inputs
    ids: list[int]
    names: list[str]
    scores: list[float]
    error: str | None = None
    probabilities: np.ndarray | None = field(default=None, repr=False)  # every class's, for a closer look
    labels: list[str] = field(default_factory=list)  # the top-k as labels.txt records them (wnids stay wnids)

    def row(self) -> dict:
        return {"path": self.input, "ids": self.ids, "names": self.names, "scores": self.scores, "error": self.error}

    def task(self) -> dict:
        """The annotation task's suggestion (without "image" and "answer": no one has answered yet): the top
        class as the annotation reader expects it, its score, and the top-k as choices."""
        return {"label": self.labels[0], "score": round(self.scores[0], 4),
                "options": [{"id": label, "text": name, "score": round(score, 4)}
                            for label, name, score in zip(self.labels, self.names, self.scores)],
                "meta": {"score": round(self.scores[0], 4)}}

    def informativeness(self, order: str) -> float:
        """From every class's probability p, sorted p1 >= p2 >= ...: uncertainty 1 - p1 (least confidence),
        margin 1 - (p1 - p2) (two classes it cannot tell apart), entropy -sum p ln p (spread over many)."""
        p = np.sort(np.asarray(self.probabilities, np.float64))[::-1]
        if order == "uncertainty":
            return float(1.0 - p[0])
        if order == "margin":
            return float(1.0 - (p[0] - (p[1] if len(p) > 1 else 0.0)))
        if order == "entropy":
            p = p[p > 0]  # p ln p -> 0 as p -> 0
            return float(-np.sum(p * np.log(p)))
        raise ValueError(f"no {order!r} score for a classification")

    def line(self) -> str:
        shown = "  ".join(f"{name} {score:.4f}" for name, score in zip(self.names, self.scores))
        return f"{self.input}  {shown}"


# ---------------------------------------------------------------- the three sources


class _Keras:
    """A run's model rebuilt from its snapshot: batches of eval-view pixels -> probabilities."""

    def __init__(self, model, view: EvalView):
        normalize = view.normalizer()
        spec = tf.TensorSpec((None, *view.shape), tf.float32)
        self.forward = tf.function(lambda pixels: tf.cast(model(normalize(pixels), training=False), tf.float32),
                                   input_signature=[spec])
        self.view, self.decodes = view, False

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.forward(pixels).numpy()


class _TFLite:
    """A .tflite file (batch-1, normalized float input): one invoke per image."""

    def __init__(self, interpreter, view: EvalView):
        self.interpreter, self.view, self.decodes = interpreter, view, False
        self.normalize = tf.function(view.normalizer())

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return predict_tflite(self.interpreter, self.normalize(pixels).numpy())


class _SavedModel:
    """An export's signatures: `serving_default` on encoded bytes (it decodes and preprocesses in its graph),
    `predict_images` on eval-view pixels (for arrays, with the view its export.json records)."""

    def __init__(self, loaded, view: EvalView | None, folder: Path):
        self.loaded, self.view, self.folder, self.decodes = loaded, view, folder, True
        self.serve = loaded.signatures["serving_default"]
        self.names_seen: dict[int, str] | None = None  # id -> label from the outputs, when export.json has none

    def _probabilities(self, outputs) -> np.ndarray:
        if self.names_seen is not None and "classes" in outputs and "labels" in outputs:
            for ids, labels in zip(outputs["classes"].numpy(), outputs["labels"].numpy()):
                self.names_seen.update({int(i): label.decode("utf-8", "replace") for i, label in zip(ids, labels)})
        return outputs["probabilities"].numpy()

    def classify_encoded(self, encoded: list[bytes]) -> np.ndarray:
        return self._probabilities(self.serve(image_bytes=tf.constant(encoded, tf.string)))

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._probabilities(self.loaded.signatures["predict_images"](images=tf.constant(pixels)))


class Predictor(ImagePredictor):
    """Top-k classes of images, from a run, a SavedModel export or a .tflite file (`from_*`)."""

    def __init__(self, backend, class_names: list[str], source: str):
        super().__init__(backend, class_names, source)
        self.class_names = readable(list(class_names))  # ImageNet wnids as words, other names as they are

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- construction
    @classmethod
    def for_source(cls, source: Source, min_score: float | None = None) -> "Predictor":
        """What `predict` runs for a classification source (`shared.predict.Source`); `min_score` is refused:
        a classifier ranks its classes by --top-k."""
        if min_score is not None:
            raise UserError("--min-score applies to detection (a score a box needs); a classifier's predictions "
                            "are ranked by --top-k")
        if source.saved_model is not None:
            return cls.from_saved_model(source.saved_model)
        if source.tflite is not None:
            return cls.from_tflite(source.tflite, source.run)
        return cls.from_run(source.run, *source.rebuilt())

    @classmethod
    def from_run(cls, run: Run | str | Path, model, config) -> "Predictor":
        """The run's model as `shared.tasks.rebuild(run, checkpoint)` gives it (model, config)."""
        run = _classification_run(run)
        names = _run_class_names(run, int(model.output_shape[-1]))
        return cls(_Keras(model, EvalView.from_config(config)), names, f"run {run.path}")

    @classmethod
    def from_saved_model(cls, folder: str | Path) -> "Predictor":
        """A version folder written by `export --format saved_model` (a model folder: its highest version)."""
        folder = saved_model_folder(Path(folder).expanduser())
        try:
            loaded = tf.saved_model.load(str(folder))
        except Exception as error:  # a damaged export: TF's own error types vary
            raise UserError(f"cannot load the SavedModel at {folder}: {first_line(error)}") from error
        serve = loaded.signatures.get("serving_default")
        if serve is None or "image_bytes" not in serve.structured_input_signature[1] \
                or "probabilities" not in serve.structured_outputs:
            raise UserError(f"the SavedModel at {folder} does not classify encoded images (its serving_default "
                            f"takes image_bytes and returns probabilities in classification exports)")
        record = export_record(folder)
        view = EvalView.from_record(record) if "image_size" in record else None
        num_classes = int(serve.structured_outputs["probabilities"].shape[-1])
        backend = _SavedModel(loaded, view, folder)
        names = record.get("class_names") or record.get("labels")
        if not names or len(names) != num_classes:  # a foreign export: names from its outputs as they come
            names = [str(i) for i in range(num_classes)]
            backend.names_seen = {}
        return cls(backend, names, f"SavedModel {folder}")

    @classmethod
    def from_tflite(cls, file: str | Path, run: Run | str | Path | None = None) -> "Predictor":
        """A .tflite file written by `export --format tflite`. It holds the model only: its preprocessing
        and class names are the run's, found from its place (<run>/export/*.tflite) or given as `run`."""
        file = Path(file).expanduser()
        interpreter = load_interpreter(file, num_threads=os.cpu_count())
        run = _classification_run(run if run is not None else owning_run(file))
        config = config_module.from_dict(run.config_dict())
        view = EvalView.from_config(config)
        detail = interpreter.get_input_details()[0]
        if tuple(detail["shape"][1:]) != view.shape:
            raise UserError(f"{file} takes images of {tuple(detail['shape'][1:])} but run {run.path} has "
                            f"{view.shape}: it was not exported from that run; give its own with --run")
        num_classes = int(interpreter.get_output_details()[0]["shape"][-1])
        return cls(_TFLite(interpreter, view), _run_class_names(run, num_classes), f"TFLite {file}")

    # ---- results
    def _prediction(self, label, result, top_k: int) -> Prediction:
        if isinstance(result, str):
            return Prediction(label, [], [], [], error=result)
        ids = np.argsort(-result, kind="stable")[:min(top_k, self.num_classes)]
        labels = self._labels(ids)
        return Prediction(label, [int(i) for i in ids], self._names(ids, labels), [float(result[i]) for i in ids],
                          probabilities=result, labels=labels)

    def _labels(self, ids) -> list[str]:
        seen = getattr(self._backend, "names_seen", None)
        if seen:  # a foreign SavedModel: the labels its outputs gave
            return [seen.get(int(i), str(int(i))) for i in ids]
        return [self.label_names[int(i)] for i in ids]

    def _names(self, ids, labels: list[str]) -> list[str]:
        if getattr(self._backend, "names_seen", None):
            return readable(labels)
        return [self.class_names[int(i)] for i in ids]

    def csv_header(self, top_k: int) -> list[str]:
        """The --out CSV's columns: the path, the top-k ids, names and scores, and why an input was skipped."""
        ranks = range(1, min(top_k, self.num_classes) + 1)
        return ["path", *(f"{what}_{rank}" for rank in ranks for what in ("id", "name", "score")), "error"]

    def csv_row(self, prediction: Prediction, top_k: int) -> list:
        """One input's CSV row (a skipped one: empty ranks and its error)."""
        k = min(top_k, self.num_classes)
        ranked = [value for i, n, s in zip(prediction.ids, prediction.names, prediction.scores)
                  for value in (i, n, f"{s:.6g}")]
        return [prediction.input, *ranked, *[""] * (3 * k - len(ranked)), prediction.error or ""]


def _classification_run(run: Run | str | Path) -> Run:
    run = run if isinstance(run, Run) else open_run(run)
    require_idle(run)  # a live run's checkpoints are still being written
    task = (run.config_dict() or {}).get("task") or "classification"
    if task != "classification":
        hint = "; find its boxes with shared.detection.predict.Detector" if task == "detection" else ""
        raise UserError(f"Predictor classifies; run {run.path} is a {task} run{hint}")
    return run


def _run_class_names(run: Run, num_classes: int) -> list[str]:
    names = run.class_names()
    if not names or len(names) != num_classes:  # a run from before labels.txt: the index is the name
        return [str(i) for i in range(num_classes)]
    return names
