"""The test gallery of a detection run (`detections.png`): test images with the predicted boxes (class and
score) over the ground truth (dashed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared import plots
from shared.detection.boxes import box_iou

GALLERY_FILE = "detections.png"
GALLERY_IMAGES = 16  # test images drawn in detections.png
GALLERY_COLUMNS = 4
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
    score."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    figure, cells = plots.cell_grid(rows, columns, 2.5, title_inches=0.25)
    palette = list(colormaps["tab10"].colors)
    for index, axes in enumerate(cells):
        if index >= count:
            continue
        image = images[index] / 255.0
        if image.shape[-1] == 1:
            axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axes.imshow(image, interpolation="nearest")
        gt_boxes, gt_classes = truth[index]
        for box in gt_boxes:
            axes.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                     edgecolor="white", linestyle="--", linewidth=1.0))
        boxes, classes, scores = detections[index]
        keep = _shown(np.asarray(boxes), np.asarray(scores), min_score)
        for i in keep:
            box, cls = boxes[i], int(classes[i])
            colour = palette[cls % len(palette)]
            axes.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                     edgecolor=colour, linewidth=1.5))
            name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
            axes.text(box[0], box[1], f"{name} {scores[i]:.2f}", color="black", fontsize=6, va="bottom",
                      bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0})
        axes.set_title(f"{len(keep)} found (>= {min_score:g}) / {len(gt_classes)} true", fontsize=7)
    return figure


def plot_detections(gallery: dict, class_names: list[str], out_png: Path) -> Path | None:
    """The gallery of `evaluate_detector` as a PNG, written atomically (None when there is no image)."""
    if not len(gallery["images"]):
        return None
    figure = detections_figure(gallery["images"], gallery["detections"], gallery["truth"], class_names)
    return plots.save_figure(figure, out_png)
