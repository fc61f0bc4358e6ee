"""Pictures of a run: training curves from metrics.csv, the test confusion matrix, the most confident
mistakes, image grids, and the augmentation preview (what the model really sees in training).

Figures are built as `matplotlib.figure.Figure` objects drawn by an explicit Agg canvas, never
through pyplot: no global state (safe from threads and callbacks), no windows, and the caller's
matplotlib backend is left untouched. Every PNG is written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import uuid
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

DPI = 100
PANEL_SIZE = (4.0, 3.2)  # inches per curve panel
GRID_CELL = 1.6  # inches per image in a grid
MAX_ANNOTATED_CLASSES = 20  # confusion cells carry their value up to this many classes
MAX_LABELLED_CLASSES = 50  # class names on the confusion axes up to this many classes
TITLE_CHARS = 18  # grid titles are cut to this length so neighbours do not overlap

LOSS_COLUMNS = ("loss", "predictions_loss")
TOP1_COLUMNS = ("top1", "predictions_top1")  # the second: models with auxiliary heads
LR_COLUMNS = ("lr", "learning_rate")


def save_figure(figure: Figure, out_png: Path) -> Path:
    """Render `figure` to `out_png` atomically: readers never see half a PNG."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name beside the target (same file system, so os.replace is atomic); opened with "xb"
    # so it gets the usual umask permissions, unlike mkstemp's 0600.
    partial = out_png.with_name(f".{out_png.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(partial, "xb") as out:
            FigureCanvasAgg(figure).print_png(out)
        os.replace(partial, out_png)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out_png


# --- training curves ---------------------------------------------------------------------------

def read_metrics(metrics_csv: Path) -> dict[str, np.ndarray]:
    """The columns of a Keras CSVLogger file as float arrays (missing values, "NA", become NaN),
    plus `epoch` made 1-based. Empty dict when the file is missing or has no rows."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return {}
    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    columns = {name: np.array([_to_float(row.get(name)) for row in rows]) for name in rows[0] if name}
    epochs = columns.get("epoch")
    columns["epoch"] = (epochs + 1 if epochs is not None and np.isfinite(epochs).all()
                        else np.arange(1, len(rows) + 1, dtype=float))  # CSVLogger counts from 0
    return columns


def _to_float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _first_present(metrics: dict[str, np.ndarray], candidates: tuple[str, ...]) -> str | None:
    return next((name for name in candidates if name in metrics and np.isfinite(metrics[name]).any()), None)


def curves_figure(metrics: dict[str, np.ndarray]) -> Figure | None:
    """One panel per quantity found (loss, top-1 accuracy, learning rate) side by side, train and
    validation per epoch. None when there is nothing to draw."""
    loss = _first_present(metrics, LOSS_COLUMNS)
    top1 = _first_present(metrics, TOP1_COLUMNS)
    lr = _first_present(metrics, LR_COLUMNS)
    panels = [(title, column) for title, column in (("loss", loss), ("top-1 accuracy", top1),
                                                     ("learning rate", lr)) if column]
    if not panels:
        return None
    figure = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    epochs = metrics["epoch"]
    for axes, (title, column) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        # Markers keep a single epoch (one point, no line) visible.
        axes.plot(epochs, metrics[column], marker="o", markersize=3, label="train")
        validation = metrics.get(f"val_{column}")
        if validation is not None and np.isfinite(validation).any():
            axes.plot(epochs, validation, marker="o", markersize=3, label="val")
            axes.legend()
        if column == lr and _spans_decade(metrics[column]):
            axes.set_yscale("log")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    return figure


def _spans_decade(values: np.ndarray) -> bool:
    """More than 10x between the smallest and largest positive value: a log axis reads better."""
    positive = values[np.isfinite(values) & (values > 0)]
    return positive.size > 0 and positive.max() > 10 * positive.min()


def plot_curves(metrics_csv: Path, out_png: Path) -> Path | None:
    """Loss, top-1 accuracy and learning rate per epoch from a CSVLogger file, written to `out_png`.
    Returns None, writing nothing, when the file is missing or has no rows."""
    figure = curves_figure(read_metrics(metrics_csv))
    return save_figure(figure, out_png) if figure is not None else None


# --- confusion matrix --------------------------------------------------------------------------

def confusion_figure(confusion, class_names: list[str] | None = None, normalize: bool = True) -> Figure:
    """A heat map of `confusion` (rows: true class, columns: predicted), each row divided by its
    total when `normalize`; the title gives the overall accuracy."""
    counts = np.asarray(confusion, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {counts.shape}")
    size = counts.shape[0]
    if class_names is not None and len(class_names) != size:
        raise ValueError(f"{len(class_names)} class names for a {size}-class confusion matrix")
    total = counts.sum()
    accuracy = np.trace(counts) / total if total else math.nan
    shown = _row_normalized(counts) if normalize else counts

    side = min(max(3.0 + 0.35 * size, 5.0), 20.0)
    figure = Figure(figsize=(side, side), dpi=DPI, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_title(f"accuracy {accuracy:.2%} of {int(total)}" + (" (rows normalized)" if normalize else ""))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if size <= MAX_LABELLED_CLASSES:
        names = class_names if class_names is not None else [str(index) for index in range(size)]
        axes.set_xticks(range(size), names, rotation=90)
        axes.set_yticks(range(size), names)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if size <= MAX_ANNOTATED_CLASSES:
        _annotate_cells(axes, shown, percent=normalize)
    return figure


def _row_normalized(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)  # unseen classes: zeros


def _annotate_cells(axes, values: np.ndarray, percent: bool) -> None:
    threshold = values.max() / 2 if values.size else 0  # light text on dark cells
    for (row, column), value in np.ndenumerate(values):
        text = f"{value:.2f}" if percent else f"{value:.0f}"
        axes.text(column, row, text, ha="center", va="center", fontsize=7,
                  color="white" if value > threshold else "black")


def plot_confusion(confusion, class_names: list[str] | None, out_png: Path, normalize: bool = True) -> Path:
    """The confusion-matrix heat map (see `confusion_figure`) written to `out_png`."""
    return save_figure(confusion_figure(confusion, class_names, normalize), out_png)


# --- image grids -------------------------------------------------------------------------------

CELL_GAP = 0.1  # inches between two cells of a row
GRID_MARGIN = 0.05  # inches around a grid
HEADING_INCHES = 0.3  # a grid's heading line (fontsize 9)


def cell_grid(rows: int, columns: int, cell: float, title_inches: float, heading: str | None = None,
              heading_size: int = 9) -> tuple[Figure, list]:
    """A figure of `rows` x `columns` empty axes (axis lines off), each `cell` inches square under
    `title_inches` for its title, with `heading` above them all; the axes row by row. Laid out by arithmetic:
    every size is fixed here, and matplotlib's constrained layout would measure each axes' ticks and titles to
    find them again (most of a grid's drawing time)."""
    top = (HEADING_INCHES if heading else 0.0) + title_inches + GRID_MARGIN  # above the first row's images
    width = columns * cell + (columns - 1) * CELL_GAP + 2 * GRID_MARGIN
    height = top + rows * cell + (rows - 1) * title_inches + GRID_MARGIN
    figure = Figure(figsize=(width, height), dpi=DPI)
    grid = figure.add_gridspec(rows, columns, left=GRID_MARGIN / width, right=1 - GRID_MARGIN / width,
                               bottom=GRID_MARGIN / height, top=1 - top / height, wspace=CELL_GAP / cell,
                               hspace=title_inches / cell)
    if heading:
        figure.suptitle(heading, fontsize=heading_size, y=1 - GRID_MARGIN / height, va="top")
    cells = [figure.add_subplot(grid[row, column]) for row in range(rows) for column in range(columns)]
    for axes in cells:
        axes.axis("off")
        for axis in (axes.xaxis, axes.yaxis):  # no ticks to make or measure when a title is placed
            axis.set_major_locator(NullLocator())
            axis.set_visible(False)
    return figure, cells


def grid_figure(images, titles: list[str] | None = None, columns: int = 8) -> Figure:
    """Images [N, H, W, C] (C 1 or 3, any value range) in a grid, `columns` wide, each stretched to
    [0, 1] on its own so normalized images are visible."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] array with C 1 or 3, got {images.shape}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    figure, cells = cell_grid(rows, columns, GRID_CELL, title_inches=0.25 if titles else 0.0)
    for index, axes in enumerate(cells):
        if index >= len(images):
            continue  # the unused cells of the last row
        image = _unit_range(images[index])
        if image.shape[-1] == 1:
            axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axes.imshow(image, interpolation="nearest")
        if titles:
            axes.set_title(_shorten(titles[index]), fontsize=7)
    return figure


def _unit_range(image: np.ndarray) -> np.ndarray:
    image = np.nan_to_num(image)
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _shorten(title: str) -> str:
    return title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS - 1] + "…"


def image_grid(images, titles: list[str] | None, out_png: Path, columns: int = 8) -> Path:
    """The image grid (see `grid_figure`) written to `out_png`."""
    return save_figure(grid_figure(images, titles, columns), out_png)


# --- most confident mistakes -------------------------------------------------------------------

def errors_figure(images, true_names: list[str], predicted_names: list[str], scores, mean: list[float] | None = None,
                  std: list[float] | None = None, columns: int = 4, sources: list[str] | None = None) -> Figure:
    """Wrongly classified images [N, H, W, C], each titled with its true and predicted class and the score of
    the prediction, and with `sources` what each image is (its file's name, cut in the middle to fit, or its
    place in the test split). With the pipeline's `mean` and `std` (per channel, 0-255 scale) the images are
    shown as they were before normalization; without, each is stretched to [0, 1] on its own. No images: a
    figure that says there were no mistakes."""
    images = np.asarray(images, dtype=np.float32)
    if not (len(images) == len(true_names) == len(predicted_names) == len(scores)) \
            or (sources is not None and len(sources) != len(images)):
        raise ValueError(f"{len(images)} images for {len(true_names)} true names, {len(predicted_names)} predicted "
                         f"names, {len(scores)} scores and {'no' if sources is None else len(sources)} sources")
    if len(images) == 0:
        figure = Figure(figsize=(4.0, 1.0), dpi=DPI, layout="constrained")
        figure.suptitle("no mistakes on the test split")
        return figure
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    title_inches = 0.4 if sources is None else 0.55  # two title lines per image, or three
    figure, cells = cell_grid(rows, columns, GRID_CELL, title_inches,
                              heading=f"the {len(images)} most confident mistakes (true / predicted score"
                                      f"{'' if sources is None else ' / image'})")
    for index, axes in enumerate(cells):
        if index >= len(images):
            continue
        image = _unnormalized(images[index], mean, std) if mean is not None and std is not None \
            else _unit_range(images[index])
        if image.shape[-1] == 1:
            axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axes.imshow(image, interpolation="nearest")
        source = "" if sources is None else f"\n{_shorten_middle(sources[index])}"
        axes.set_title(f"{_shorten(true_names[index])}\n{_shorten(predicted_names[index])} {scores[index]:.2f}"
                       f"{source}", fontsize=7)
    return figure


def _shorten_middle(name: str) -> str:
    """A file name cut in the middle to fit a title: its start, and more of its end, where names differ (the
    number, the extension)."""
    if len(name) <= TITLE_CHARS:
        return name
    head = TITLE_CHARS // 3
    return f"{name[:head]}…{name[-(TITLE_CHARS - 1 - head):]}"


def _unnormalized(image: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """A normalized image ((x - mean) / std on the 0-255 scale) back on [0, 1]."""
    return np.clip((np.nan_to_num(image) * np.asarray(std) + np.asarray(mean)) / 255.0, 0.0, 1.0)


def plot_errors(images, true_names: list[str], predicted_names: list[str], scores, out_png: Path,
                mean: list[float] | None = None, std: list[float] | None = None,
                sources: list[str] | None = None) -> Path:
    """The most confident mistakes (see `errors_figure`) written to `out_png`."""
    return save_figure(errors_figure(images, true_names, predicted_names, scores, mean, std, sources=sources),
                       out_png)


# --- augmentation preview ----------------------------------------------------------------------

def preview(config, out_png: Path, count: int = 32, seed: int | None = None) -> Path:
    """`count` augmented training images, as the training pipeline of `config` makes them (the
    model's own augment.py and batch MixUp / CutMix included), titled with their class, written to
    `out_png`. `seed` replaces train.seed for this preview only."""
    # Imported here: curves and confusion plots of a finished run should not pay for TensorFlow.
    from shared import modelzoo
    from shared.data import make_datasets

    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    if seed is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    augment_module = modelzoo.load_augment_module(modelzoo.model_dir(config.model.name, config.model.path))
    datasets = make_datasets(config, augment_module)
    images, labels = _take_examples(datasets.train, count)
    titles = [_label_title(label, datasets.class_names) for label in labels]
    return image_grid(images, titles, out_png)


def _take_examples(dataset, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` examples of a batched (repeating) dataset, across as many batches as needed."""
    images, labels, taken = [], [], 0
    for batch_images, batch_labels in dataset:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        taken += len(images[-1])
        if taken >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def _label_title(label: np.ndarray, class_names: list[str]) -> str:
    """A class index gives its name; a (mixed) one-hot vector its strongest class and that weight."""
    if np.ndim(label) == 0:
        return class_names[int(label)]
    strongest = int(np.argmax(label))
    return f"{class_names[strongest]} {float(label[strongest]):.2f}"
