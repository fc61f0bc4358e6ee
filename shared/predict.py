"""Predict with what a run trained, whatever its task: the generic layer of the `predict` command. It reads the
inputs (image paths and / or numpy arrays), runs a task's predictor on them in batches and writes what comes out.

Files are read and decoded in a tf.data pipeline (in parallel, in order) and run in batches; a file that cannot be
read or decoded becomes a result with `error` set instead of stopping the rest. What a prediction IS (classes,
boxes), and the record it writes (its CSV columns, JSON keys, annotation task), belongs to the task's predictor
(an `ImagePredictor` subclass in its package's predict.py), which the task a `Source` names opens
(`Task.open_predictor`, called by `shared.tasks.open_predictor`). `python -m shared.runner predict` is the
command line (`command` below). `--format tasks` writes the predictions as an annotation tool's tasks
(`shared.annotations`' format, without an answer): suggestions to accept or correct, in input order or, with
`--order`, the images the model is least sure of first (`task_file`; what a prediction's score is, its task says:
`Result.informativeness`).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import csv
import glob
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from shared.annotation_tasks import DEFAULT_SEED, SCORED_ORDERS, checked_order, json_line, task_file
from shared.durable import partial_path
from shared.errors import UserError
from shared.eval_view import EvalView
from shared.export import versions
from shared.runs import Run

DEFAULT_BATCH = 64
PROGRESS_FROM = 64  # inputs: fewer finish before a progress bar would help
OUT_FORMATS = {"csv": ".csv", "jsonl": ".jsonl", "tasks": ".jsonl"}  # --format -> the --out extension it writes
GLOB_CHARS = frozenset("*?[")


class Result(Protocol):
    """One input's prediction as a task's predictor makes it; `error` (and nothing found) when it was skipped."""
    input: str | int  # the path, or the array's position among the inputs
    error: str | None

    def line(self) -> str:
        """What the command prints for it."""

    def row(self) -> dict:
        """Its --out JSON line."""

    def task(self) -> dict:
        """The annotation task's suggestion (without "image" and "answer": no one has answered yet)."""

    def informativeness(self, order: str) -> float:
        """How much an annotator's answer to it would teach the model, by one of SCORED_ORDERS: the higher,
        the sooner it is asked."""


def first_line(error: BaseException) -> str:
    """The first line of an error, without TensorFlow's op decorations ({{function_node ...}}, [Op:...])."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:.*", "", text.strip().splitlines()[0] if text.strip() else "")
    return " ".join(text.split()) or type(error).__name__


# ---------------------------------------------------------------- what predict runs


@dataclass(frozen=True)
class Source:
    """What `predict` runs: a run (with a checkpoint), its SavedModel export (a version folder, or a model folder
    for its newest version) or its .tflite file with the run it was exported from (whose preprocessing and
    names it takes). The task it names (`task_name`) opens its predictor (`Task.open_predictor`)."""
    run: Run | None = None
    saved_model: str | Path | None = None
    tflite: str | Path | None = None
    checkpoint: str | Path | None = None  # the run's: last (None), best or a file
    # (run, checkpoint file) -> (model, config): the one rebuild (`shared.tasks.rebuild`), passed down from the top
    rebuild: Callable[[Run, Path], tuple[Any, Any]] | None = None

    @classmethod
    def of(cls, run: Run | None = None, saved_model: str | Path | None = None, tflite: str | Path | None = None,
           checkpoint: str | Path | None = None, rebuild: Callable | None = None) -> "Source":
        """The source the command line names; a .tflite file without --run takes the run whose export/ holds it."""
        if tflite is not None and run is None and Path(tflite).expanduser().is_file():
            run = owning_run(Path(tflite).expanduser())  # the file holds no preprocessing: its run's is used
        return cls(run, saved_model, tflite, checkpoint, rebuild)

    @property
    def task_name(self) -> str | None:
        """The task the source names, read without TensorFlow: the export's export.json (a model folder: its
        newest version) or the run's config.yaml; None where neither names one (the default task)."""
        if self.saved_model is not None:
            return export_record(saved_model_folder(Path(self.saved_model).expanduser())).get("task")
        return (self.run.config_dict() or {}).get("task") if self.run is not None else None

    def rebuilt(self) -> tuple[Any, Any]:
        """The run's model rebuilt from its snapshot with the checkpoint (`Run.checkpoint`), and its config."""
        return self.rebuild(self.run, self.run.checkpoint(self.checkpoint or "last"))

    def __str__(self) -> str:
        if self.saved_model is not None:
            return f"SavedModel {saved_model_folder(Path(self.saved_model).expanduser())}"
        return f"TFLite {Path(self.tflite).expanduser()}" if self.tflite is not None else f"run {self.run.path}"


def checked_min_score(min_score: float | None) -> float | None:
    """--min-score as given (None: not given), refused outside 0..1 before any source is opened."""
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise UserError(f"--min-score is {min_score:g}; give a score between 0 and 1")
    return min_score


# ---------------------------------------------------------------- reading inputs, in batches


class ImagePredictor(abc.ABC):
    """Runs a backend on images, in batches, one result per input in input order: files read (and, but for a
    backend that `decodes` them itself, decoded and preprocessed with its eval `view`) in a tf.data pipeline,
    arrays preprocessed with the view. What a result is, and the record it writes (`csv_header`, `csv_row`,
    and the result's `line`, `row` and `task`), is the task's subclass's (`_prediction`).

    A backend has `view` (an EvalView, or None) and `decodes`, and `classify_pixels(batch of view pixels)` or,
    when it decodes, `classify_encoded(list of encoded images)`: one raw result per image."""

    def __init__(self, backend, label_names: list[str], source: str):
        self._backend = backend
        self.label_names = list(label_names)  # as labels.txt records them: what an annotation file names
        self.source = source  # what it predicts with, for messages

    @abc.abstractmethod
    def _prediction(self, label, result, top_k: int) -> Result:
        """The Result of one input from the backend's raw result, or from the reason it was skipped (a str)."""

    @abc.abstractmethod
    def csv_header(self, top_k: int) -> list[str]:
        """The --out CSV's columns, "path" first and "error" (why an input was skipped) last."""

    @abc.abstractmethod
    def csv_row(self, result: Any, top_k: int) -> list:
        """One result's CSV row."""

    def predict(self, inputs: Iterable[Any], top_k: int = 5, batch_size: int = DEFAULT_BATCH) -> list:
        """One result per input, in order: image paths (str / Path) and / or numpy arrays (H x W [x C],
        uint8 or float 0-255). top_k: at least 1; more than the class count gives every class."""
        return list(self.iter_predict(inputs, top_k, batch_size))

    def iter_predict(self, inputs: Iterable[Any], top_k: int = 5, batch_size: int = DEFAULT_BATCH) -> Iterator:
        """`predict`, one result at a time as the batches finish (inputs are read as they come: a
        generator of many paths is never held whole)."""
        if top_k < 1:
            raise UserError(f"--top-k must be at least 1 (got {top_k})")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        for kind, items in itertools.groupby(enumerate(inputs), key=lambda item: _kind(*item)):
            run = self._arrays if kind == "array" else self._files  # each group is used up before the next
            for _, label, result in run(items, batch_size):
                yield self._prediction(label, result, top_k)

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
                outputs = self._backend.classify_pixels(np.stack([p for _, p in good]))
                results.update({index: row for (index, _), row in zip(good, outputs)})
            for index, _ in chunk:
                yield index, index, results[index]

    # files: read (and, but for a backend that decodes them, decoded and preprocessed) in a tf.data pipeline
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
        """The backend on a batch of encoded images; when its graph fails to decode one, each again alone, so
        only the damaged ones are skipped."""
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


# ---------------------------------------------------------------- what the sources need


def owning_run(file: Path) -> Run:
    """The run a .tflite file was exported into (<run>/export/): it holds the model only, not its preprocessing."""
    folder = file.resolve().parent
    if folder.name == "export" and (folder.parent / "config.yaml").is_file():
        return Run(folder.parent)
    raise UserError(f"{file} holds only the model, not its preprocessing or class names, and is not in a run's "
                    f"export/ folder; name the run it was exported from with --run RUN")



def saved_model_folder(folder: Path) -> Path:
    """The SavedModel version folder `folder` names: itself, or a model folder's highest version."""
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


def command(predictor_factory: Callable[[], ImagePredictor], arguments: list[str], top_k: int = 5,
            out: str | None = None, strict: bool = False, batch_size: int = DEFAULT_BATCH,
            fmt: str | None = None, order: str | None = None, seed: int | None = None) -> None:
    """`python -m shared.runner predict`: print each image's top-k, or boxes, and write each to `out` as `fmt`
    says (`out_format`) as it comes, nothing held in memory; a file that cannot be read is one line on stderr
    and a row with its `error` (csv, jsonl), or with `strict` the end of the command (a UserError). `out`
    appears whole when every input was read: a stopped command leaves no half file. `order` (tasks only,
    `checked_order`): the order of the tasks file (`task_file`), `seed` that of --order random."""
    from shared.progress import progress_bar

    fmt = out_format(out, fmt)
    order = checked_order(order, fmt, seed)
    seed = DEFAULT_SEED if seed is None else seed
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
        if fmt == "tasks":  # published (or removed, when the command stops) when the stack closes
            write = stack.enter_context(task_file(Path(out), order, seed))
        elif fmt is not None:  # closed, then published (or removed, when the command stops) in that order
            partial = stack.enter_context(partial_path(Path(out)))
            handle = stack.enter_context(open(partial, "w", encoding="utf-8", errors="surrogateescape", newline=""))
            write = _row_writer(fmt, predictor, top_k, handle)
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
        ordered = "" if order == "file" else f", {order} order" + (" (highest first)" if order in SCORED_ORDERS
                                                                    else f" (seed {seed})")
        print(f"wrote {read} {'tasks' if fmt == 'tasks' else 'predictions'}{kept} to {out}{ordered}")
    if skipped:
        print(f"skipped {skipped} file{'s' if skipped > 1 else ''} that could not be read as images",
              file=sys.stderr)
    if not read and skipped:
        raise UserError(f"none of the {skipped} files could be read as an image")


def _row_writer(fmt: str, predictor: ImagePredictor, top_k: int, handle) -> Callable[[Any], None]:
    """Writes one result to the open --out file: a CSV row (header first) or a JSON line."""
    if fmt == "csv":
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(predictor.csv_header(top_k))
        return lambda result: writer.writerow(predictor.csv_row(result, top_k))
    return lambda result: handle.write(json_line(result.row()))


def _say(bar, line: str, stream) -> None:
    try:
        if bar is not None and not bar.disable:
            bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)  # a line at a time: a reader that stops is noticed here
    except BrokenPipeError:  # `predict ... | head`: the reader has gone; classify on (for --out) in silence
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
