"""Classify images with what a run trained: the run itself (its snapshot and a checkpoint), its SavedModel
export or its .tflite file, each with the run's own eval preprocessing (`shared.eval_view`).

    from shared.predict import Predictor
    Predictor.from_run("runs/resnet/v0001").predict(["a.jpg"], top_k=5)

Inputs are image paths and / or numpy arrays (H x W [x C], uint8 or float 0-255). Files are read and
decoded in a tf.data pipeline (in parallel, in order) and classified in batches; a file that cannot be read
or decoded becomes a `Prediction` with `error` set instead of stopping the rest. `python -m shared.runner
predict` is the command line (`command` below); for a detection run or export it finds boxes instead
(`open_predictor` picks `shared.detection.predict.Detector`). `--format tasks` writes the predictions as an
annotation tool's tasks (`shared.annotations`' format, without an answer): suggestions to accept or correct.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import glob
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from shared.errors import UserError
from shared.eval_view import EvalView
from shared.runs import Run, open_run

DEFAULT_BATCH = 64
PROGRESS_FROM = 64  # inputs: fewer finish before a progress bar would help
OUT_FORMATS = {"csv": ".csv", "jsonl": ".jsonl", "tasks": ".jsonl"}  # --format -> the --out extension it writes
GLOB_CHARS = frozenset("*?[")


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

    def line(self) -> str:
        return format_line(self)


def first_line(error: BaseException) -> str:
    """The first line of an error, without TensorFlow's op decorations ({{function_node ...}}, [Op:...])."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:.*", "", text.strip().splitlines()[0] if text.strip() else "")
    return " ".join(text.split()) or type(error).__name__


# ---------------------------------------------------------------- the three sources


class _Keras:
    """A run's model rebuilt from its snapshot: batches of eval-view pixels -> probabilities."""

    def __init__(self, model, view: EvalView):
        import tensorflow as tf

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
        import tensorflow as tf

        self.interpreter, self.view, self.decodes = interpreter, view, False
        self.normalize = tf.function(view.normalizer())

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        from shared.tflite import predict_tflite

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
        import tensorflow as tf

        return self._probabilities(self.serve(image_bytes=tf.constant(encoded, tf.string)))

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self._probabilities(self.loaded.signatures["predict_images"](images=tf.constant(pixels)))


class Predictor:
    """Top-k classes of images, from a run, a SavedModel export or a .tflite file (`from_*`)."""

    def __init__(self, backend, class_names: list[str], source: str):
        from shared.class_names import readable

        self._backend = backend
        self.class_names = readable(list(class_names))  # ImageNet wnids as words, other names as they are
        self.label_names = list(class_names)  # as labels.txt records them: what an annotation file names
        self.source = source  # what it predicts with, for messages

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- construction
    @classmethod
    def from_run(cls, run: Run | str | Path, checkpoint: str | Path | None = None) -> "Predictor":
        """The run's model rebuilt from its own snapshot with a checkpoint (`Run.checkpoint`: None or "last",
        "best" for checkpoints/best.keras kept with train.best, or a file)."""
        from shared.tasks import rebuild

        run = _classification_run(run)
        model, config = rebuild(run, run.checkpoint(checkpoint or "last"))
        names = _run_class_names(run, int(model.output_shape[-1]))
        return cls(_Keras(model, EvalView.from_config(config)), names, f"run {run.path}")

    @classmethod
    def from_saved_model(cls, folder: str | Path) -> "Predictor":
        """A version folder written by `export --format saved_model` (a model folder: its highest version)."""
        import tensorflow as tf

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
        from shared import config as config_module
        from shared.tflite import load_interpreter

        file = Path(file).expanduser()
        interpreter = load_interpreter(file, num_threads=os.cpu_count())
        run = _classification_run(run if run is not None else _owning_run(file))
        config = config_module.from_dict(run.config_dict())
        view = EvalView.from_config(config)
        detail = interpreter.get_input_details()[0]
        if tuple(detail["shape"][1:]) != view.shape:
            raise UserError(f"{file} takes images of {tuple(detail['shape'][1:])} but run {run.path} has "
                            f"{view.shape}: it was not exported from that run; give its own with --run")
        num_classes = int(interpreter.get_output_details()[0]["shape"][-1])
        return cls(_TFLite(interpreter, view), _run_class_names(run, num_classes), f"TFLite {file}")

    # ---- prediction
    def predict(self, inputs: Iterable[Any], top_k: int = 5, batch_size: int = DEFAULT_BATCH) -> list[Prediction]:
        """One Prediction per input, in order: image paths (str / Path) and / or numpy arrays (H x W [x C],
        uint8 or float 0-255). top_k: at least 1; more than the class count gives every class."""
        return list(self.iter_predict(inputs, top_k, batch_size))

    def iter_predict(self, inputs: Iterable[Any], top_k: int = 5,
                     batch_size: int = DEFAULT_BATCH) -> Iterator[Prediction]:
        """`predict`, one Prediction at a time as the batches finish (inputs are read as they come: a
        generator of many paths is never held whole)."""
        if top_k < 1:
            raise UserError(f"--top-k must be at least 1 (got {top_k})")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        k = min(top_k, self.num_classes)
        for kind, items in itertools.groupby(enumerate(inputs), key=lambda item: _kind(*item)):
            run = self._arrays if kind == "array" else self._files  # each group is used up before the next
            for _, label, result in run(items, batch_size):
                yield self._prediction(label, result, k)

    def _prediction(self, label, result, k: int) -> Prediction:
        if isinstance(result, str):
            return Prediction(label, [], [], [], error=result)
        ids = np.argsort(-result, kind="stable")[:k]
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
            from shared.class_names import readable

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

    # arrays: preprocessed here with the view, classified as pixels
    def _arrays(self, items, batch_size: int) -> Iterator[tuple[int, int, np.ndarray | str]]:
        view = self._backend.view
        if view is None:
            raise UserError(f"{self.source} has no assets.extra/export.json saying its preprocessing; "
                            f"give it image files, or predict on arrays with the run (--run)")
        for chunk in _chunks(items, batch_size):
            good, results = [], {}
            for index, array in chunk:
                try:
                    good.append((index, view.pixels(_as_image(array)).numpy()))
                except (ValueError, UserError) as error:
                    results[index] = f"not an image array ({first_line(error)})"
            if good:
                probabilities = self._backend.classify_pixels(np.stack([p for _, p in good]))
                results.update({index: row for (index, _), row in zip(good, probabilities)})
            for index, _ in chunk:
                yield index, index, results[index]

    # files: read (and, but for a SavedModel, decoded and preprocessed) in a tf.data pipeline
    def _files(self, items, batch_size: int) -> Iterator[tuple[int, str, np.ndarray | str]]:
        import tensorflow as tf

        backend = self._backend
        pending: collections.deque = collections.deque()  # (index, path) handed to the pipeline, not yet out
        failures: list[BaseException] = []

        def paths():
            try:
                for index, path in items:
                    path = os.fspath(path)
                    pending.append((index, path))
                    yield index, os.fsencode(path)  # bytes: a name need not be UTF-8
            except Exception as error:  # raised here, TF would wrap it (and ignore_errors drop it): kept for below
                failures.append(error)

        def load(index, path):
            encoded = tf.io.read_file(path)
            return index, (encoded if backend.decodes else backend.view.pixels(encoded, path))

        dataset = (tf.data.Dataset.from_generator(paths, output_signature=(tf.TensorSpec((), tf.int64),
                                                                           tf.TensorSpec((), tf.string)))
                   .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   .ignore_errors()  # an unreadable file leaves a gap in the indexes: named below
                   .batch(batch_size)
                   .prefetch(2))
        for indexes, batch in dataset:
            indexes = indexes.numpy()
            if backend.decodes:
                arrived = self._classify_encoded(indexes, list(batch.numpy()))
            else:
                arrived = dict(zip(indexes.tolist(), backend.classify_pixels(batch.numpy())))
            yield from self._in_order(pending, arrived, until=int(indexes[-1]))
        yield from self._in_order(pending, {}, until=None)
        if failures:
            raise failures[0]

    def _classify_encoded(self, indexes, encoded: list[bytes]) -> dict:
        """The SavedModel on a batch of encoded images; when its graph fails to decode one, each again
        alone, so only the damaged ones are skipped."""
        import tensorflow as tf

        try:
            return dict(zip(indexes.tolist(), self._backend.classify_encoded(encoded)))
        except tf.errors.InvalidArgumentError:
            if len(encoded) == 1:
                return {int(indexes[0]): _why_undecodable(encoded[0], self._backend.view)}
        results = {}
        for index, one in zip(indexes.tolist(), encoded):
            results.update(self._classify_encoded(np.array([index]), [one]))
        return results

    def _in_order(self, pending: collections.deque, arrived: dict, until: int | None):
        """Results in input order; an index the pipeline dropped is a file it could not read or decode."""
        while pending and (until is None or pending[0][0] <= until):
            index, path = pending.popleft()
            result = arrived.get(index)
            if result is None:
                result = _why_unreadable(path, self._backend.view)
            yield index, path, result


def _chunks(items, size: int):
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _kind(index: int, item) -> str:
    if isinstance(item, np.ndarray):
        return "array"
    if isinstance(item, (str, os.PathLike)):
        return "path"
    raise UserError(f"input {index} is a {type(item).__name__}; give image paths (str, Path) or numpy arrays")


def _as_image(array: np.ndarray):
    """An array as the eval view takes it: H x W x C, uint8 kept (as the eval pipeline's pixels), else float."""
    import tensorflow as tf

    if array.ndim == 2:
        array = array[:, :, None]  # grayscale without a channel axis
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"shape {array.shape} is not H x W x C")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"dtype {array.dtype} is not numeric")
    return tf.constant(array if array.dtype == np.uint8 else array.astype(np.float32))


def _why_unreadable(path: str, view: EvalView | None) -> str:
    if os.path.isdir(path):  # a folder _walk could not list
        try:
            os.listdir(path)
        except OSError as error:
            return f"cannot list the folder ({error.strerror})"
        return "a folder"
    try:
        with open(path, "rb") as file:
            encoded = file.read()
    except OSError as error:
        return error.strerror or first_line(error)
    return _why_undecodable(encoded, view)


def _why_undecodable(encoded: bytes, view: EvalView | None) -> str:
    """Why an image was not classified: what the formats table refuses it for (its header), else the decoder's
    own complaint."""
    import tensorflow as tf

    from shared.data import formats, preprocess
    from shared.errors import embedded_user_error

    try:
        formats.facts(encoded, view.max_pixels if view is not None else None)
        if view is not None:
            view.pixels(tf.constant(encoded))
        else:
            preprocess.decode(tf.constant(encoded), 3)
    except formats.Refused as why:
        return str(why)
    except tf.errors.OpError as error:
        embedded = embedded_user_error(error)
        return str(embedded) if embedded is not None else f"does not decode ({first_line(error)})"
    return "the model failed on it"


# ---------------------------------------------------------------- the command line's source


def source_task(run: Run | None = None, saved_model: str | Path | None = None) -> str:
    """The task of what predict runs, read without TensorFlow: the export's export.json (a model folder: its
    newest version) or the run's config.yaml; classification where neither names one."""
    if saved_model is not None:
        return export_record(saved_model_folder(Path(saved_model).expanduser())).get("task") or "classification"
    return ((run.config_dict() or {}).get("task") if run is not None else None) or "classification"


def open_predictor(run: Run | None = None, saved_model: str | Path | None = None, tflite: str | Path | None = None,
                   checkpoint: str | Path | None = None, min_score: float | None = None) -> Predictor:
    """The predictor for one source, by its task: a `Predictor` (classes) or a
    `shared.detection.predict.Detector` (boxes, from `min_score` up); `min_score` only applies to detection."""
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise UserError(f"--min-score is {min_score:g}; give a score between 0 and 1")
    if tflite is not None and run is None and Path(tflite).expanduser().is_file():
        run = _owning_run(Path(tflite).expanduser())  # the file holds no preprocessing: its run's is used
    task = source_task(run, saved_model)
    if task == "detection":
        from shared.detection.predict import Detector

        if tflite is not None:
            return Detector.from_tflite(tflite, run, min_score)
        if saved_model is not None:
            return Detector.from_saved_model(saved_model, min_score)
        return Detector.from_run(run, checkpoint, min_score)
    if min_score is not None:
        raise UserError("--min-score applies to detection (a score a box needs); a classifier's predictions are "
                        "ranked by --top-k")
    if saved_model is not None:
        return Predictor.from_saved_model(saved_model)
    if tflite is not None:
        return Predictor.from_tflite(tflite, run)
    return Predictor.from_run(run, checkpoint)


# ---------------------------------------------------------------- what the sources need


def _classification_run(run: Run | str | Path) -> Run:
    from shared.runs import require_idle
    from shared.tasks import task_for

    run = run if isinstance(run, Run) else open_run(run)
    require_idle(run)  # a live run's checkpoints are still being written
    task = task_for(run)
    if task.name != "classification":
        hint = "; find its boxes with shared.detection.predict.Detector" if task.name == "detection" else ""
        raise UserError(f"Predictor classifies; run {run.path} is a {task.name} run{hint}")
    return run


def _run_class_names(run: Run, num_classes: int) -> list[str]:
    names = run.class_names()
    if not names or len(names) != num_classes:  # a run from before labels.txt: the index is the name
        return [str(i) for i in range(num_classes)]
    return names


def _owning_run(file: Path) -> Run:
    folder = file.resolve().parent
    if folder.name == "export" and (folder.parent / "config.yaml").is_file():
        return Run(folder.parent)
    raise UserError(f"{file} holds only the model, not its preprocessing or class names, and is not in a run's "
                    f"export/ folder; name the run it was exported from with --run RUN")


def saved_model_folder(folder: Path) -> Path:
    """The SavedModel version folder `folder` names: itself, or a model folder's highest version."""
    from shared.export import versions

    if (folder / "saved_model.pb").is_file():
        return folder
    found = versions(folder)
    if found and (found[max(found)] / "saved_model.pb").is_file():
        return found[max(found)]  # a model folder: the version TF Serving would serve
    raise UserError(f"no SavedModel at {folder} (a version folder with saved_model.pb, written by "
                    f"`export --format saved_model`)")


def export_record(folder: Path) -> dict:
    """What an export recorded beside its model (assets.extra/export.json); {} for a foreign export."""
    try:
        return json.loads((folder / "assets.extra" / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- paths for the command line


class Paths:
    """The command line's paths: `check()` refuses, before any work, what cannot give an image (no arguments,
    a missing path, a glob matching nothing, a folder without images); iterating yields files as given (a file
    named explicitly is tried whatever its extension), folders as their image files (recursively, in name order,
    one folder listing at a time) and globs as their sorted matches, lazily. What the check listed is reused,
    so no folder (of a million files, say) is listed twice. Linked folders are not followed (no loops)."""

    def __init__(self, arguments: list[str]):
        self.arguments = [os.fspath(argument) for argument in arguments]
        self._listed: dict[str, list] = {}  # folder -> its sorted entries, listed by check()
        self._globbed: dict[str, list[str]] = {}

    def check(self) -> "Paths":
        from shared.data.listing import IMAGE_SUFFIXES  # shared.data loads TensorFlow: not before it is needed

        if not self.arguments:
            raise UserError("give the images to classify: files, folders (searched recursively) or globs")
        for argument in self.arguments:
            if os.path.lexists(argument):
                if os.path.isdir(argument) and next(self._walk(argument, keep=True), None) is None:
                    raise UserError(f"no images in {argument} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
                                    f"files, recursively)")
            elif GLOB_CHARS & set(argument):
                if not self._matches(argument):
                    raise UserError(f"no file matches {argument}")
            else:
                raise UserError(f"no such file or folder: {argument}")
        return self

    def __iter__(self) -> Iterator[str]:
        for argument in self.arguments:
            if not os.path.lexists(argument) and GLOB_CHARS & set(argument):
                for match in self._globbed.pop(argument, None) or self._matches(argument):
                    yield from self._walk(match) if os.path.isdir(match) else [match]
            elif os.path.isdir(argument):
                yield from self._walk(argument)
            else:
                yield argument

    def _matches(self, pattern: str) -> list[str]:
        self._globbed[pattern] = sorted(glob.glob(pattern, recursive=True))
        return self._globbed[pattern]

    def _walk(self, folder: str, keep: bool = False) -> Iterator[str]:
        from shared.data.listing import is_image_file

        entries = self._listed.pop(folder, None)
        if entries is None:
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError:
                yield folder  # reported as skipped with the reason, as an unreadable file is
                return
        if keep:
            self._listed[folder] = entries
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, keep)
            elif entry.is_file() and is_image_file(entry.path):
                yield entry.path


def expand_paths(arguments: list[str]) -> Iterator[str]:
    """The image files the command line's paths name (`Paths`), checked first."""
    return iter(Paths(arguments).check())


# ---------------------------------------------------------------- the command


def out_format(out: str | None, fmt: str | None = None) -> str | None:
    """What --out holds (csv, jsonl or tasks): `fmt` when given (its extension must match), else by the
    extension (.csv, .jsonl: prediction rows); None without --out."""
    if fmt is not None and fmt not in OUT_FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(OUT_FORMATS)}")
    if out is None:
        if fmt is not None:
            raise UserError(f"--format {fmt} says what --out holds; give --out FILE{OUT_FORMATS[fmt]}")
        return None
    suffix = Path(out).suffix.lower()
    if fmt is None:
        if suffix not in (".csv", ".jsonl"):
            raise UserError(f"--out {out}: the format is chosen by the extension; use .csv or .jsonl "
                            f"(or --format tasks with FILE.jsonl)")
        return suffix[1:]
    if suffix != OUT_FORMATS[fmt]:
        raise UserError(f"--format {fmt} writes {OUT_FORMATS[fmt]} files, not --out {out}; name it "
                        f"{Path(out).with_suffix(OUT_FORMATS[fmt]).name}")
    return fmt


def format_line(prediction: Prediction) -> str:
    shown = "  ".join(f"{name} {score:.4f}" for name, score in zip(prediction.names, prediction.scores))
    return f"{prediction.input}  {shown}"


def task_image(path: str, folder: str) -> str:
    """An image's path in a tasks file in `folder`: relative to it when the image lies under it (the tasks
    file moves with its images), else absolute (the reader resolves relative paths against that folder,
    not against where predict ran)."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, folder)
    return absolute if relative.split(os.sep)[0] == os.pardir else relative


def _json_line(row: dict) -> str:
    """Unicode as it is; a file name that is not UTF-8 as \\udcXX escapes (os.fsencode gets its bytes back), so
    the file stays valid UTF-8 JSON."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"


def command(predictor_factory: Callable[[], Predictor], arguments: list[str], top_k: int = 5,
            out: str | None = None, strict: bool = False, batch_size: int = DEFAULT_BATCH,
            fmt: str | None = None) -> None:
    """`python -m shared.runner predict`: print each image's top-k, or boxes, and write each to `out` as `fmt`
    says (`out_format`) as it comes, nothing held in memory; a file that cannot be read is one line on stderr
    and a row with its `error` (csv, jsonl), or with `strict` the end of the command (a UserError). `out`
    appears whole when every input was read: a stopped command leaves no half file."""
    from shared.durable import partial_path
    from shared.progress import progress_bar

    fmt = out_format(out, fmt)
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {top_k})")
    paths = iter(Paths(arguments).check())
    predictor = predictor_factory()
    head = list(itertools.islice(paths, PROGRESS_FROM))
    # a bar (terminals only, shared.progress) once there are many; its total stays open: a folder is walked as
    # it is classified, not counted first
    bar = progress_bar(unit="image", leave=False, dynamic_ncols=True) if len(head) == PROGRESS_FROM else None
    read = skipped = 0
    with contextlib.ExitStack() as stack:
        write = None
        if fmt is not None:  # closed, then published (or removed, when the command stops) in that order
            partial = stack.enter_context(partial_path(Path(out)))
            handle = stack.enter_context(open(partial, "w", encoding="utf-8", errors="surrogateescape", newline=""))
            write = _row_writer(fmt, predictor, top_k, handle, Path(out))
        if bar is not None:
            stack.callback(bar.close)
        for prediction in predictor.iter_predict(itertools.chain(head, paths), top_k, batch_size):
            if bar is not None:
                bar.update()
            if prediction.error is not None:
                if strict:
                    raise UserError(f"cannot classify {prediction.input}: {prediction.error} "
                                    f"(--strict stops at the first; leave it out to skip such files)")
                skipped += 1
                _say(bar, f"skipped {prediction.input}: {prediction.error}", sys.stderr)
            else:
                read += 1
                _say(bar, prediction.line(), sys.stdout)
            if write is not None:
                write(prediction)
    if fmt is not None:
        kept = "" if fmt == "tasks" or not skipped else f" (and {skipped} skipped, each with its error)"
        print(f"wrote {read} {'tasks' if fmt == 'tasks' else 'predictions'}{kept} to {out}")
    if skipped:
        print(f"skipped {skipped} file{'s' if skipped > 1 else ''} that could not be read as images",
              file=sys.stderr)
    if not read and skipped:
        raise UserError(f"none of the {skipped} files could be read as an image")


def _row_writer(fmt: str, predictor: Predictor, top_k: int, handle, out: Path) -> Callable[[Any], None]:
    """Writes one result to the open --out file: a CSV row (header first), a JSON line, or an annotation task
    (`shared.annotations`' format, no "answer"; a skipped image is no task) with its image as the annotation
    reader finds it from `out`'s folder."""
    if fmt == "csv":
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(predictor.csv_header(top_k))
        return lambda result: writer.writerow(predictor.csv_row(result, top_k))
    if fmt == "jsonl":
        return lambda result: handle.write(_json_line(result.row()))
    folder = os.path.abspath(out.parent)

    def task(result) -> None:
        if result.error is None:
            handle.write(_json_line({"image": task_image(result.input, folder), **result.task()}))
    return task


def _say(bar, line: str, stream) -> None:
    try:
        if bar is not None and not bar.disable:
            bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)  # a line at a time: a reader that stops is noticed here
    except BrokenPipeError:  # `predict ... | head`: the reader has gone; classify on (for --out) in silence
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
