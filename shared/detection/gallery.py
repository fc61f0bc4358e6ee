"""The test gallery of a detection run (`detections.png`): test images with the predicted boxes (class and
score) over the ground truth (dashed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared import plots
from shared.detection.boxes import box_iou

GALLERY_FILE = "detections.png"
GALLERY_IMAGES = 16  # test images drawn in detections.png
GALLERY_COLUMNS = 4
GALLERY_CELL = 2.5  # inches per image
GALLERY_MIN_SCORE = 0.3  # predictions drawn from this score up (all of them count in the mAP)
GALLERY_MAX_BOXES = 10  # predictions drawn per image, best first
GALLERY_OVERLAP = 0.5  # a prediction overlapping a better drawn one more than this (any class) is not drawn


def _shown(boxes: np.ndarray, scores: np.ndarray, min_score: float) -> list[int]:
    """The predictions drawn: from `min_score` up, best first, at most GALLERY_MAX_BOXES, and none that
    overlaps a better drawn one by IoU > GALLERY_OVERLAP whatever its class (NMS is per class, so one object
    may carry several class hypotheses; the picture shows the best)."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < min_score or len(kept) == GALLERY_MAX_BOXES:
            break
        if not kept or not (box_iou(boxes[i], boxes[kept]) > GALLERY_OVERLAP).any():
            kept.append(int(i))
    return kept


def detections_figure(images: np.ndarray, detections: list, truth: list, class_names: list[str],
                      columns: int = GALLERY_COLUMNS, min_score: float = GALLERY_MIN_SCORE):
    """A grid of images (0-255 pixels [N, S, S, C]) with the ground-truth boxes dashed white and the
    predictions scoring at least `min_score` (see `_shown`) in their class's colour, labelled with class and
    score. The images are one picture (`plots.montage_figure`); the boxes are drawn over it, each clipped to
    its image (the labels are not, as axes texts were not)."""
    from matplotlib import colormaps
    from matplotlib.transforms import Bbox, TransformedBbox

    count = len(images)
    columns = max(1, min(columns, count))
    layout = plots.grid_layout(count, columns, GALLERY_CELL, title_inches=0.25)
    shown = [image / 255.0 for image in images]
    kept = [_shown(np.asarray(boxes), np.asarray(scores), min_score) for boxes, _, scores in detections]
    titles = [f"{len(keep)} found (>= {min_score:g}) / {len(gt_classes)} true"
              for keep, (_, gt_classes) in zip(kept, truth)]
    figure = plots.montage_figure(layout, shown, titles)
    pixels = plots.pixel_transform(figure, layout)
    palette = list(colormaps["tab10"].colors)
    for index, image in enumerate(images):
        where = layout.image_box(index, *np.shape(image)[:2])
        clip = TransformedBbox(Bbox.from_bounds(*where), pixels)  # boxes end at the image's edge, as in its axes
        gt_boxes, _ = truth[index]
        for box in gt_boxes:
            _outline(figure, _in_grid(box, where, np.shape(image)), pixels, clip, edgecolor="white",
                     linestyle="--", linewidth=1.0)
        boxes, classes, scores = detections[index]
        for i in kept[index]:
            cls = int(classes[i])
            colour = palette[cls % len(palette)]
            x0, y0, _, _ = _outline(figure, _in_grid(boxes[i], where, np.shape(image)), pixels, clip,
                                    edgecolor=colour, linewidth=1.5)
            name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
            figure.text(x0, y0, f"{name} {scores[i]:.2f}", color="black", fontsize=6, va="bottom", transform=pixels,
                        bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0})
    return figure


def _in_grid(box, where: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """An xyxy box in an image's pixels, in the grid's pixels when the image is shown at `where` (x, y, width,
    height). Box coordinates are continuous, as COCO's and VOC's boxes are read: pixel 0 spans 0 to 1, so a box
    (0, 0, W, H) is the whole image."""
    x, y, width, height = where
    across, down = width / shape[1], height / shape[0]
    return x + box[0] * across, y + box[1] * down, x + box[2] * across, y + box[3] * down


def _outline(figure, box: tuple[float, float, float, float], transform, clip, **style) -> tuple[float, ...]:
    """An unfilled rectangle over the figure (box xyxy in `transform`'s coordinates), clipped to `clip`."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = box
    patch = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, transform=transform, **style)
    figure.add_artist(patch).set_clip_box(clip)
    return box


def plot_detections(gallery: dict, class_names: list[str], out_png: Path) -> Path | None:
    """The gallery of `evaluate_detector` as a PNG, written atomically (None when there is no image)."""
    if not len(gallery["images"]):
        return None
    figure = detections_figure(gallery["images"], gallery["detections"], gallery["truth"], class_names)
    return plots.save_figure(figure, out_png)
