"""Boxes in image files, from a detection run (its snapshot and a checkpoint), its SavedModel export or its
TFLite file: the detection side of `shared.predict`, which reads the inputs.

    from shared.detection.predict import Detector
    from shared.tasks import rebuild
    run = open_run("runs/resnet/v0002")
    Detector.from_run(run, *rebuild(run), min_score=0.3).predict(["a.jpg"])   # [Detections, ...]

A run and a SavedModel run the same function on encoded bytes (`shared.detection.serving.
detection_serving_functions`: decode, resize, normalize, detect, per-class NMS); a TFLite file gets the same
decoding, resizing and normalization and runs its own post-processing op. Boxes come in the pixels of each
image as read.
`Detector` is an `ImagePredictor`: it reads files as every task's predictor does (a tf.data pipeline, input
order, a damaged file skipped with its reason); what a result is, and the record it writes, are its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.config_schema import with_changes
from shared.errors import UserError
from shared.predict import ImagePredictor, Source, export_record, first_line, saved_model_folder
from shared.runs import Run, open_run, require_idle

SHOWN_BOXES = 3  # boxes named in an image's printed line, best first


@dataclass
class Detections:
    """One image's boxes, best score first: `spans` as an annotation tool takes them (x, y, width, height in
    the image's pixels, label as labels.txt records it, score); `error` (and no spans) when it was skipped."""
    input: str | int
    spans: list[dict] = field(default_factory=list)
    error: str | None = None

    def row(self) -> dict:
        return {"path": self.input, "spans": self.spans, "error": self.error}

    def task(self) -> dict:
        """The annotation task's suggestion (without "image" and "answer": no one has answered yet)."""
        return {"spans": self.spans, "meta": {"boxes": len(self.spans)}}

    def informativeness(self, order: str) -> float:
        """The image's least confident box's, from each box's score s (the chance it is right): uncertainty
        1 - s, margin 1 - |2s - 1| (s against 1 - s), entropy -s ln s - (1 - s) ln(1 - s). An image without a
        box scores 0 (last): nothing reached --min-score, so the model is sure it holds none of its classes
        and there is no suggestion to correct; a lower --min-score lets its faint boxes be scored."""
        s = np.clip(np.array([span["score"] for span in self.spans], np.float64), 0.0, 1.0)
        if not s.size:
            return 0.0
        if order == "uncertainty":
            per_box = 1.0 - s
        elif order == "margin":
            per_box = 1.0 - np.abs(2.0 * s - 1.0)
        elif order == "entropy":
            with np.errstate(divide="ignore", invalid="ignore"):  # 0 ln 0 -> 0 at s = 0 or 1
                per_box = -np.nan_to_num(s * np.log(s)) - np.nan_to_num((1.0 - s) * np.log(1.0 - s))
        else:
            raise ValueError(f"no {order!r} score for detections")
        return float(per_box.max())

    def line(self, shown: int = SHOWN_BOXES) -> str:
        best = "  ".join(f"{s['label']} {s['score']:.4f} @{s['x']:g},{s['y']:g} {s['width']:g}x{s['height']:g}"
                         for s in self.spans[:shown])
        count = f"{len(self.spans)} box{'es' if len(self.spans) != 1 else ''}"
        return f"{self.input}  {count}" + (f"  {best}" if best else "")


class _Boxes:
    """A detect function on a batch of encoded images -> per image (boxes xyxy, classes, scores) above
    `min_score`. It decodes in its graph (`decodes`); a file it cannot decode is named without a view."""

    decodes = True
    view = None

    def __init__(self, detect, min_score: float):
        self.detect, self.min_score = detect, float(min_score)

    def classify_encoded(self, encoded: list[bytes]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        import tensorflow as tf

        found = {key: value.numpy() for key, value in self.detect(image_bytes=tf.constant(encoded, tf.string)).items()}
        results = []
        for i, count in enumerate(found["num_detections"]):
            scores = found["scores"][i, :count]
            keep = scores >= self.min_score
            results.append((found["boxes"][i, :count][keep], found["classes"][i, :count][keep], scores[keep]))
        return results

    def classify_pixels(self, pixels):  # arrays are refused before this (Detector._arrays)
        raise NotImplementedError


class _TFLiteBoxes(_Boxes):
    """A detection .tflite ending in the post-processing op, one invoke per image: decoded and resized as
    the evaluation pipeline does, normalized as the run's detection.json says, boxes scaled back to each
    image's pixels. One LiteRT thread unless the file's NMS is the class-agnostic one: the op's per-class
    NMS on N threads skips class N (`tflite.postprocess_signature`)."""

    def __init__(self, path: Path, config, nms: str, min_score: float):
        import tensorflow as tf

        from shared.data import preprocess
        from shared.detection import serving, tflite, tflite_inference

        data = config.data
        self.size = data.image_size
        prep = serving.preprocessing(config)
        normalize = preprocess.normalizer(prep["mean"], prep["std"], data.normalize, self.size)
        self.interpreter = tflite_inference.tflite_interpreter(path, num_threads=None if nms == "fast" else 1)
        if not tflite_inference.is_postprocess_file(self.interpreter):
            raise UserError(f"{path} has the raw outputs (--raw-outputs); predict reads the default form, "
                            f"ending in {tflite.POSTPROCESS_OP}: export it without --raw-outputs")
        shape = tuple(int(n) for n in self.interpreter.get_input_details()[0]["shape"][1:])
        if shape != (self.size, self.size, data.channels):
            raise UserError(f"{path} takes images of {shape} but its run has {(self.size, self.size, data.channels)}: "
                            f"it was not exported from that run; give its own with --run")

        def prepare(encoded):
            pixels, shape = serving.eval_pixels(encoded, self.size, data.channels, data.max_pixels)
            return normalize(pixels[None]), shape

        self.prepare = tf.function(prepare, input_signature=[tf.TensorSpec([], tf.string)])
        self.min_score = float(min_score)

    def classify_encoded(self, encoded: list[bytes]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from shared.detection.tflite_inference import predict_tflite_postprocess

        results = []
        for one in encoded:
            image, (height, width) = (value.numpy() for value in self.prepare(one))
            (boxes, classes, scores), = predict_tflite_postprocess(self.interpreter, image, self.size)
            keep = scores >= self.min_score
            scale = np.array([width, height, width, height], np.float32) / self.size
            results.append((boxes[keep] * scale, classes[keep], scores[keep]))
        return results


class Detector(ImagePredictor):
    """Boxes in image files, from a detection run, its SavedModel export or its TFLite file (`from_*`);
    `predict` and `iter_predict` as every ImagePredictor's (top_k does not apply), each result a `Detections`."""

    # ---- construction
    @classmethod
    def for_source(cls, source: Source, min_score: float | None = None) -> "Detector":
        """What `predict` runs for a detection source (`shared.predict.Source`), from `min_score` up."""
        if source.tflite is not None:
            return cls.from_tflite(source.tflite, source.run, min_score)
        if source.saved_model is not None:
            return cls.from_saved_model(source.saved_model, min_score)
        return cls.from_run(source.run, *source.rebuilt(), min_score)

    @classmethod
    def from_run(cls, run: Run | str | Path, detector, config, min_score: float | None = None) -> "Detector":
        """The run's detector as `shared.tasks.rebuild(run, checkpoint)` gives it (model, config), with the
        export's decoding; `min_score` (default the run's detection.score_threshold) is also its NMS threshold,
        so it may be lower than the run's."""
        import tensorflow as tf

        from shared.detection.serving import detection_serving_functions

        run = _detection_run(run)
        min_score = _min_score(min_score, config.detection.score_threshold)
        config = with_changes(config, {"detection.score_threshold": min_score})
        names = run.class_names() or [str(i) for i in range(config.data.num_classes)]
        bytes_fn, _ = detection_serving_functions(detector, config, names)
        detect = tf.function(bytes_fn, input_signature=[tf.TensorSpec([None], tf.string)])
        return cls(_Boxes(detect, min_score), names, f"run {run.path}")

    @classmethod
    def from_saved_model(cls, folder: str | Path, min_score: float | None = None) -> "Detector":
        """A version folder written by `export` from a detection run (a model folder: its highest version).
        Its graph already dropped boxes under the threshold its export.json records: `min_score` may only
        be higher."""
        import tensorflow as tf

        folder = saved_model_folder(Path(folder).expanduser())
        record = export_record(folder)
        min_score = _not_below(min_score, float(record.get("score_threshold", 0.0)), f"the SavedModel at {folder}")
        try:
            loaded = tf.saved_model.load(str(folder))
        except Exception as error:  # a damaged export: TF's own error types vary
            raise UserError(f"cannot load the SavedModel at {folder}: {first_line(error)}") from error
        serve = loaded.signatures.get("serving_default")
        if serve is None or "num_detections" not in serve.structured_outputs:
            raise UserError(f"the SavedModel at {folder} does not detect (its serving_default returns no "
                            f"num_detections, as detection exports do)")
        names = record.get("labels")
        if not names:
            raise UserError(f"the SavedModel at {folder} has no class names in assets.extra/export.json; "
                            f"export the detection run again")
        detector = cls(_Boxes(serve, min_score), names, f"SavedModel {folder}")
        detector._loaded = loaded  # the signature's variables live as long as the loaded object
        return detector

    @classmethod
    def from_tflite(cls, file: str | Path, run: Run | str | Path, min_score: float | None = None) -> "Detector":
        """A detection .tflite file written by `export --format tflite` (its default form) of `run`, whose
        evaluation preprocessing and labels it takes. Its op already dropped boxes under the run's
        score_threshold: `min_score` may only be higher."""
        from shared import config as config_module
        from shared.detection.tflite_inference import INFO_FILE

        file = Path(file).expanduser()
        if not file.is_file():
            raise UserError(f"no TFLite model at {file}; export one first")
        run = _detection_run(run)
        config = config_module.from_dict(run.config_dict())
        min_score = _not_below(min_score, float(config.detection.score_threshold), f"{file}'s post-processing")
        info = {}
        if (file.parent / INFO_FILE).is_file():
            info = json.loads((file.parent / INFO_FILE).read_text(encoding="utf-8")).get("models", {})
        nms = info.get(file.name, {}).get("nms", "regular")
        names = run.class_names() or [str(i) for i in range(config.data.num_classes)]
        return cls(_TFLiteBoxes(file, config, nms, min_score), names, f"TFLite {file}")

    # ---- results
    def _prediction(self, label, result, top_k: int) -> Detections:
        if isinstance(result, str):
            return Detections(label, error=result)
        boxes, classes, scores = result
        spans = []
        for (x1, y1, x2, y2), cls, score in zip(boxes.tolist(), classes.tolist(), scores.tolist()):
            x, y, width, height = round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)
            if width > 0 and height > 0:  # a box clipped to nothing at the image's edge is no suggestion
                spans.append({"x": x, "y": y, "width": width, "height": height,
                              "label": self._label(int(cls)), "score": round(float(score), 4)})
        return Detections(label, spans)

    def _label(self, index: int) -> str:
        return self.label_names[index] if 0 <= index < len(self.label_names) else str(index)

    def _arrays(self, items, batch_size: int):
        raise UserError(f"{self.source} detects in image files; give paths, not arrays")

    def csv_header(self, top_k: int) -> list[str]:
        """The --out CSV's columns: the path, its box count, its spans as JSON, why it was skipped."""
        return ["path", "boxes", "spans", "error"]

    def csv_row(self, result: Detections, top_k: int) -> list:
        return [result.input, len(result.spans) if result.error is None else "",
                json.dumps(result.spans, ensure_ascii=False) if result.error is None else "", result.error or ""]


def _detection_run(run: Run | str | Path) -> Run:
    run = run if isinstance(run, Run) else open_run(run)
    require_idle(run)
    task = (run.config_dict() or {}).get("task") or "classification"
    if task != "detection":
        raise UserError(f"Detector finds boxes; run {run.path} is a {task} run"
                        + ("; classify with shared.classification.predict.Predictor" if task == "classification"
                           else ""))
    return run


def _min_score(min_score: float | None, default: float) -> float:
    if min_score is None:
        return float(default)
    if not 0.0 <= min_score <= 1.0:
        raise UserError(f"--min-score is {min_score:g}; give a score between 0 and 1")
    return float(min_score)


def _not_below(min_score: float | None, built_in: float, applier: str) -> float:
    """`min_score` (default `built_in`) for an export that already dropped the boxes under `built_in`: a lower
    one is refused, as it could not be honoured."""
    min_score = _min_score(min_score, built_in)
    if min_score < built_in:
        raise UserError(f"--min-score {min_score:g} is below the {built_in:g} {applier} applies inside; predict "
                        f"with --run RUN for lower scores, or raise --min-score")
    return min_score
