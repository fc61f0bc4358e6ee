"""Pictures of a run: training curves from metrics.csv, the test confusion matrix, the most confident
mistakes, image grids, and the augmentation preview (what the model really sees in training).

Figures are built as `matplotlib.figure.Figure` objects drawn by an explicit Agg canvas, never
through pyplot: no global state (safe from threads and callbacks), no windows, and the caller's
matplotlib backend is left untouched. Every PNG is written atomically (temporary file + rename).

Nothing is laid out by drawing it first: an image grid is one picture (`montage_figure`, no axes per image)
with its titles at places computed from `grid_layout`, and the margins of the curves, the confusion matrix
and the single-axes figures of other modules (`place_axes`) are added up from the widths of the texts in them,
where matplotlib's constrained layout laid out every tick to measure it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps, rcParams
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.cbook import is_math_text
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Affine2D, Transform

DPI = 100
PANEL_SIZE = (4.0, 3.2)  # inches per curve panel
GRID_CELL = 1.6  # inches per image in a grid
MAX_ANNOTATED_CLASSES = 20  # confusion cells carry their value up to this many classes
MAX_LABELLED_CLASSES = 50  # class names on the confusion axes up to this many classes
TITLE_CHARS = 18  # grid titles are cut to this length so neighbours do not overlap
PNG_COMPRESS_LEVEL = 1  # zlib level of every PNG written (Pillow's default: 6)

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
            # zlib's fastest level: the same pixels, a third less time to encode, files about 5 % larger.
            FigureCanvasAgg(figure).print_png(out, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
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
    figure = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), dpi=DPI)
    epochs = metrics["epoch"]
    drawn = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (title, column) in zip(drawn, panels):
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
    _place_panels(figure, drawn)
    return figure


def _place_panels(figure: Figure, panels) -> None:
    """Each panel in its PANEL_SIZE slot, left to right, all the same size: margins for the widest of any."""
    left, bottom, right, top = np.max([_margins(axes) for axes in panels], axis=0)
    width, height = figure.get_size_inches()
    slot = width / len(panels)
    for index, axes in enumerate(panels):
        axes.set_position(((index * slot + left) / width, bottom / height, (slot - left - right) / width,
                           (height - bottom - top) / height))


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
    figure = Figure(figsize=(side, side), dpi=DPI)
    axes = figure.subplots()
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    colorbar = figure.colorbar(image, cax=figure.add_axes((0.9, 0.1, 0.05, 0.8)))  # placed by _place_confusion
    title = f"accuracy {accuracy:.2%} of {int(total)}" + (" (rows normalized)" if normalize else "")
    axes.set_title(title)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    names = []
    if size <= MAX_LABELLED_CLASSES:
        names = class_names if class_names is not None else [str(index) for index in range(size)]
        axes.set_xticks(range(size), names, rotation=90)
        axes.set_yticks(range(size), names)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if size <= MAX_ANNOTATED_CLASSES:
        _annotate_cells(axes, shown, percent=normalize)
    _place_confusion(figure, axes, colorbar.ax, names, title)
    return figure


def _place_confusion(figure: Figure, axes, colorbar_axes, names: list[str], title: str) -> None:
    """The square heat map as large as the figure allows with room for the class names (left and, turned,
    below), the axis labels, the title above and the colorbar to its right (as tall as the map, 1/20 as wide, a
    gap of 1/20 of the map before it, its tick labels after it); the title is kept inside the figure."""
    side = figure.get_size_inches()[0]
    names_width = max((text_width(name, rcParams["xtick.labelsize"]) for name in names), default=0.0)
    ticks = _tick_inches("xtick") + names_width if names else 0.0
    labelled = LAYOUT_PAD + _line_height(rcParams["axes.labelsize"]) + rcParams["axes.labelpad"] / 72 + ticks
    top = LAYOUT_PAD + rcParams["axes.titlepad"] / 72 + _line_height(rcParams["axes.titlesize"])
    colorbar_labels = max((text_width(label, rcParams["ytick.labelsize"])
                           for label in _tick_labels(colorbar_axes.yaxis)), default=0.0)
    after = _tick_inches("ytick") + colorbar_labels + LAYOUT_PAD  # right of the colorbar
    across = side - labelled - after  # the map and its colorbar: 1.1 map widths
    square = min(across / 1.1, side - labelled - top)
    # Centred over the map, the title must not end past the figure's right edge: a smaller map where that
    # leaves it a fair size (names as long as the figure is wide leave no room to the title whatever the map).
    half_title = text_width(title, rcParams["axes.titlesize"]) / 2
    title_fits = 2 * (side - LAYOUT_PAD - half_title - labelled)  # the largest map that fits it, at the left
    if title_fits >= 0.5 * square:
        square = min(square, title_fits)
    # The map centred in the room left, but not so far right that the title's end leaves the figure.
    left = labelled + max(0.0, min((across - 1.1 * square) / 2, side - LAYOUT_PAD - half_title - square / 2 - labelled))
    bottom = labelled + max(0.0, (side - labelled - top - square) / 2)
    axes.set_position((left / side, bottom / side, square / side, square / side))
    colorbar_axes.set_position(((left + 1.05 * square) / side, bottom / side, square / 20 / side, square / side))


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


# --- layout by arithmetic ----------------------------------------------------------------------
# Constrained layout found the margins by laying out every axes' ticks and texts twice before the drawing, a
# third of a curves or confusion figure's time. These figures know what is in their margins: the margins are
# added up from rcParams and the widths of those texts, measured as Agg lays them out, without drawing.

LAYOUT_PAD = 3 / 72  # inches at the figure's edges and between panels, as constrained layout leaves


_measuring = threading.local()  # a renderer per thread that measures text (Agg's fonts are per thread)


def _text_size(text: str, size: float | str) -> tuple[float, float]:
    """(width, height) in inches of one line of `text` at `size` (points or a name, "large") as Agg lays it out,
    mathtext between $ signs too. One renderer per thread, kept: its mathtext parser caches what it parsed."""
    renderer = getattr(_measuring, "renderer", None)
    if renderer is None:
        renderer = _measuring.renderer = RendererAgg(1, 1, DPI)
    width, height, _ = renderer.get_text_width_height_descent(text, FontProperties(size=size),
                                                              ismath=is_math_text(text))
    return width / DPI, height / DPI


def text_width(text: str, size: float | str) -> float:
    """Inches one line of `text` takes at `size` (points or a name, "large"), as Agg draws it."""
    return _text_size(text, size)[0]


def _line_height(size: float | str) -> float:
    """The height matplotlib gives a line of text at `size` (that of "lp": ascender and descender)."""
    return _text_size("lp", size)[1]


def _tick_labels(axis) -> list[str]:
    """The major tick labels `axis` will draw (and a few beyond its view: the locator's own margin), from its
    locator and formatter as drawing calls them."""
    return [label for label in axis.get_major_formatter().format_ticks(axis.get_majorticklocs()) if label]


def _tick_inches(name: str) -> float:
    """The tick mark and its gap to the label, rcParams "xtick" or "ytick"."""
    return (rcParams[f"{name}.major.size"] + rcParams[f"{name}.major.pad"]) / 72


def _margins(axes, twin=None) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) inches taken by what surrounds `axes`: the y tick labels and label on the
    left (`twin`'s, a twinx, on the right), the x tick labels and label below, the title above (without one, half
    a tick label: the top y tick label's), each side with LAYOUT_PAD. Without a twin, the right side holds half
    the widest x tick label (the last one may sit at the edge)."""
    tick_line = _line_height(rcParams["ytick.labelsize"])

    def label(text: str) -> float:
        return rcParams["axes.labelpad"] / 72 + _line_height(rcParams["axes.labelsize"]) if text else 0.0

    def widest(axis, name: str) -> float:
        return max((text_width(text, rcParams[f"{name}.labelsize"]) for text in _tick_labels(axis)), default=0.0)

    left = _tick_inches("ytick") + widest(axes.yaxis, "ytick") + label(axes.get_ylabel())
    right = (_tick_inches("ytick") + widest(twin.yaxis, "ytick") + label(twin.get_ylabel()) if twin
             else widest(axes.xaxis, "xtick") / 2)
    bottom = _tick_inches("xtick") + _line_height(rcParams["xtick.labelsize"]) + label(axes.get_xlabel())
    top = (rcParams["axes.titlepad"] / 72 + _line_height(rcParams["axes.titlesize"]) if axes.get_title()
           else tick_line / 2)
    if any(axis.get_major_formatter().get_offset() for axis in (axes.yaxis, *((twin.yaxis,) if twin else ()))):
        top = max(top, tick_line * 1.5)  # an offset ("1e6") above the y axis
    return left + LAYOUT_PAD, bottom + LAYOUT_PAD, right + LAYOUT_PAD, top + LAYOUT_PAD


def place_axes(figure: Figure, axes: Axes, twin: Axes | None = None, right: float = 0.0) -> None:
    """`axes` (and `twin`, its twinx) filling `figure` but for the room its tick labels, axis labels and title
    take, and `right` inches more on the right (texts beside points that may stick out of the axes): what
    constrained layout makes of a single axes, found by arithmetic. Call it once everything is drawn in."""
    left, bottom, right_margin, top = _margins(axes, twin)
    width, height = figure.get_size_inches()
    position = (left / width, bottom / height, (width - left - right_margin - right) / width,
                (height - bottom - top) / height)
    for each in (axes, twin) if twin else (axes,):
        each.set_position(position)


# --- image grids -------------------------------------------------------------------------------

CELL_GAP = 0.1  # inches between two cells of a row
GRID_MARGIN = 0.05  # inches around a grid
HEADING_INCHES = 0.3  # a grid's heading line (fontsize 9)
GRAY = colormaps["gray"]  # one-channel images


def _pixels(inches: float) -> int:
    return round(inches * DPI)


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where the parts of an image grid fall, in the figure's pixels (at DPI) from its top left corner: cell k
    (row by row) is a `cell`-pixel square under `title` pixels for its title; `top` pixels above the first
    row's titles hold the heading. Every size is fixed by arithmetic, so drawing measures nothing."""

    rows: int
    columns: int
    cell: int
    title: int
    top: int
    width: int
    height: int

    def cell_origin(self, index: int) -> tuple[int, int]:
        """The top left corner (x, y) of cell `index`'s square."""
        row, column = divmod(index, self.columns)
        return (_pixels(GRID_MARGIN) + column * (self.cell + _pixels(CELL_GAP)),
                self.top + self.title + row * (self.cell + self.title))

    def image_box(self, index: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of an image of `height` x `width` pixels in cell `index`: as large as the
        square allows, its aspect kept, centred (what imshow does in a square axes)."""
        x, y = self.cell_origin(index)
        shown_width = self.cell if width >= height else max(1, round(self.cell * width / height))
        shown_height = self.cell if height >= width else max(1, round(self.cell * height / width))
        return (x + (self.cell - shown_width) // 2, y + (self.cell - shown_height) // 2, shown_width, shown_height)


def grid_layout(count: int, columns: int, cell: float, title_inches: float, heading: bool = False) -> GridLayout:
    """The layout of `count` images, `columns` wide, each `cell` inches square under `title_inches` for its
    title, with a heading line above them all when `heading`."""
    rows = max(1, math.ceil(count / columns))
    top = _pixels((HEADING_INCHES if heading else 0.0) + GRID_MARGIN)
    cell_pixels, title = _pixels(cell), _pixels(title_inches)
    width = columns * cell_pixels + (columns - 1) * _pixels(CELL_GAP) + 2 * _pixels(GRID_MARGIN)
    height = top + rows * (title + cell_pixels) + _pixels(GRID_MARGIN)
    return GridLayout(rows, columns, cell_pixels, title, top, width, height)


def montage(images: Sequence[np.ndarray], layout: GridLayout) -> np.ndarray:
    """The grid's pixels, uint8 [height, width, 3]: white, with image k ([H, W, 1 or 3] on [0, 1], one channel
    shown gray) in its box (`GridLayout.image_box`), enlarged by nearest neighbour as imshow's
    interpolation="nearest" shows it. Values outside [0, 1] are clipped."""
    canvas = np.full((layout.height, layout.width, 3), 255, np.uint8)
    for index, image in enumerate(images):
        image = np.asarray(image, dtype=np.float32)
        height, width = image.shape[:2]
        x, y, shown_width, shown_height = layout.image_box(index, height, width)
        # Each shown pixel takes the source pixel under its centre.
        rows = ((np.arange(shown_height) + 0.5) * height / shown_height).astype(np.intp)
        columns = ((np.arange(shown_width) + 0.5) * width / shown_width).astype(np.intp)
        image = np.clip(image, 0.0, 1.0)
        # The bytes imshow makes (its gray colormap, or RGB * 255 truncated), before enlarging: fewer values.
        pixels = GRAY(image[..., 0], bytes=True)[..., :3] if image.shape[-1] == 1 else (image * 255).astype(np.uint8)
        canvas[y:y + shown_height, x:x + shown_width] = pixels[rows[:, None], columns[None, :]]  # 1 channel: gray
    return canvas


def pixel_transform(figure: Figure, layout: GridLayout) -> Transform:
    """Matplotlib's transform from a grid's pixels (x right, y down from the top left corner) to the figure."""
    return Affine2D().scale(1 / layout.width, -1 / layout.height).translate(0, 1) + figure.transFigure


def montage_figure(layout: GridLayout, images: Sequence[np.ndarray], titles: list[str] | None = None,
                   title_size: int = 7, heading: str | None = None, heading_size: int = 9) -> Figure:
    """A figure of `layout`'s size showing `images` (see `montage`) as one picture, no axes, each image titled
    just above its box. One picture instead of an axes per cell: axes (their ticks, spines, clipping) were most
    of a grid's drawing time."""
    figure = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    figure.add_artist(_Pixels(montage(images, layout)))
    if heading:
        figure.suptitle(heading, fontsize=heading_size, y=1 - _pixels(GRID_MARGIN) / layout.height, va="top")
    if titles:
        pixels = pixel_transform(figure, layout)
        pad = rcParams["axes.titlepad"] * DPI / 72  # points to pixels: where an axes title would sit
        for index, (image, title) in enumerate(zip(images, titles)):
            x, y, width, _ = layout.image_box(index, *np.shape(image)[:2])
            # "baseline" puts a text's last line on y, as an axes title is placed.
            figure.text(x + width / 2, y - pad, title, fontsize=title_size, ha="center", va="baseline",
                        transform=pixels)
    return figure


class _Pixels(Artist):
    """A picture the size of its figure, drawn pixel for pixel. Not `figure.figimage`: a FigureImage resamples
    even at one to one, a third of a grid's drawing time once its cells have no axes."""

    def __init__(self, rgb: np.ndarray):
        super().__init__()
        alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        self._rgba = np.ascontiguousarray(np.concatenate([rgb, alpha], axis=-1)[::-1])  # renderers: bottom row first

    def draw(self, renderer) -> None:
        if not self.get_visible():
            return
        gc = renderer.new_gc()
        renderer.draw_image(gc, 0, 0, self._rgba)
        gc.restore()


def grid_figure(images, titles: list[str] | None = None, columns: int = 8) -> Figure:
    """Images [N, H, W, C] (C 1 or 3, any value range) in a grid, `columns` wide, each stretched to
    [0, 1] on its own so normalized images are visible."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] array with C 1 or 3, got {images.shape}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    columns = max(1, min(columns, len(images)))
    layout = grid_layout(len(images), columns, GRID_CELL, title_inches=0.25 if titles else 0.0)
    return montage_figure(layout, [_unit_range(image) for image in images],
                          [_shorten(title) for title in titles] if titles else None)


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
    title_inches = 0.4 if sources is None else 0.55  # two title lines per image, or three
    layout = grid_layout(len(images), columns, GRID_CELL, title_inches, heading=True)
    shown = [_unnormalized(image, mean, std) if mean is not None and std is not None else _unit_range(image)
             for image in images]
    titles = [f"{_shorten(true)}\n{_shorten(predicted)} {score:.2f}"
              + ("" if sources is None else f"\n{_shorten_middle(sources[index])}")
              for index, (true, predicted, score) in enumerate(zip(true_names, predicted_names, scores))]
    return montage_figure(layout, shown, titles,
                          heading=f"the {len(images)} most confident mistakes (true / predicted score"
                                  f"{'' if sources is None else ' / image'})")


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
