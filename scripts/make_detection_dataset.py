"""Build a small real-image detection dataset from Fashion-MNIST: 1-4 clothing items per canvas, each scaled to
20-56 px (from the 28 px originals), placed at random with at most mild overlap (IoU <= 0.3, and no box more
than half covered by another), with its class and a tight box (from the item's non-zero pixels, not its 28 x 28 frame).

    python scripts/make_detection_dataset.py OUT [--train 2000] [--test 400] [--size 96] [--seed 0] [--rgb]
                                                 [--tfrecord] [--voc]

Writes OUT/images/{train,test}/<split>_NNNNNN.png and OUT/annotations/{train,test}.json (COCO: file_name
relative to OUT/images, category ids 1..10 in Fashion-MNIST's class order); with --tfrecord also
OUT/tfrecord/{train,test}.tfrecord and OUT/tfrecord/label_map.pbtxt (TF Object Detection API); with --voc also
a Pascal VOC layout in OUT/voc (Annotations/, JPEGImages/ holding the same PNGs, ImageSets/Main/{train,test}.txt
and labels.txt, the class order). Train items come from Fashion-MNIST's training images, test items from its
test images. The same seed and arguments give the same files; train does not depend on --test, nor test on
--train. Grayscale canvases are black with the items pasted on (their non-zero pixels over what lies below);
--rgb gives each canvas a dark random tint and each item a random colour.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402

SPLITS = {"train": 0, "test": 1}  # split -> its index in the seed sequence (independent random streams)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--test", type=int, default=400, help="test images (default 400)")
    parser.add_argument("--size", type=int, default=96, help="canvas side in pixels (default 96)")
    parser.add_argument("--min-scale", type=int, default=20, help="smallest item side in pixels (default 20)")
    parser.add_argument("--max-scale", type=int, default=56, help="largest item side in pixels (default 56)")
    parser.add_argument("--max-items", type=int, default=4, help="items per image, 1 to this (default 4)")
    parser.add_argument("--max-iou", type=float, default=0.3,
                        help="largest IoU of an item's box with any other in its image (default 0.3)")
    parser.add_argument("--max-cover", type=float, default=0.5,
                        help="largest fraction of a box's area that another box may overlap, so a small item is "
                             "never hidden under a large one at a low IoU (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--rgb", action="store_true", help="3-channel images: tinted backgrounds, coloured items")
    parser.add_argument("--tfrecord", action="store_true", help="also write TF Object Detection API TFRecords")
    parser.add_argument("--voc", action="store_true", help="also write a Pascal VOC layout in OUT/voc")
    parser.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder with the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    from shared.errors import UserError

    if args.train < 1 or args.test < 1:
        raise UserError(f"--train {args.train} and --test {args.test} must both be at least 1")
    if args.size < 16:
        raise UserError(f"--size {args.size} is too small for the items; use 16 or more (e.g. 96)")
    if not 4 <= args.min_scale <= args.max_scale:
        raise UserError(f"--min-scale {args.min_scale} and --max-scale {args.max_scale}: need 4 <= min <= max")
    if args.min_scale > args.size:
        raise UserError(f"--min-scale {args.min_scale} is larger than --size {args.size}; lower it")
    if args.max_items < 1:
        raise UserError(f"--max-items {args.max_items} must be at least 1")
    if not 0.0 <= args.max_iou <= 1.0 or not 0.0 <= args.max_cover <= 1.0:
        raise UserError(f"--max-iou {args.max_iou} and --max-cover {args.max_cover} must be in [0, 1]")


def overlaps(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of one xyxy box with each of `others` [K, 4], and the intersection over the smaller box's area."""
    x_min = np.maximum(box[0], others[:, 0])
    y_min = np.maximum(box[1], others[:, 1])
    x_max = np.minimum(box[2], others[:, 2])
    y_max = np.minimum(box[3], others[:, 3])
    inter = np.clip(x_max - x_min, 0, None) * np.clip(y_max - y_min, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter), inter / np.minimum(area, areas)


def compose(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, args: argparse.Namespace
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One canvas: (uint8 image [S, S] or [S, S, 3], boxes float32 [N, 4] xyxy, classes int32 [N])."""
    from PIL import Image

    size = args.size
    canvas = (np.zeros((size, size), np.float32) if not args.rgb
              else np.broadcast_to(rng.uniform(0, 90, 3), (size, size, 3)).astype(np.float32))
    boxes, classes = [], []
    for _ in range(int(rng.integers(1, args.max_items + 1))):
        index = int(rng.integers(len(items)))
        side = int(rng.integers(args.min_scale, min(args.max_scale, size) + 1))
        item = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR))
        mask = item > 0  # the tight box: the item's own non-zero pixels, not its square frame
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if not len(rows):
            continue  # an empty item (none in Fashion-MNIST, but cheap to guard)
        for _ in range(30):  # a few tries at a place overlapping the others little enough
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            box = np.array([x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1], np.float32)
            if not boxes:
                break
            iou, cover = overlaps(box, np.array(boxes))
            if iou.max() <= args.max_iou and cover.max() <= args.max_cover:
                break
        else:
            continue  # no room for it: fewer items on this canvas
        region = canvas[y:y + side, x:x + side]
        if args.rgb:
            tint = rng.uniform(0.45, 1.0, 3) * 255.0
            alpha = (item / 255.0)[..., None]
            region[mask] = (region * (1 - alpha) + tint * alpha)[mask]
        else:
            region[mask] = item[mask]  # the item's pixels over what lies below, its black frame transparent
        boxes.append(box)
        classes.append(int(labels[index]))
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int32)


def make_split(split: str, count: int, items: np.ndarray, labels: np.ndarray, args: argparse.Namespace):
    """Generate and save the images of one split; returns its DetectionSplit (records point at the PNGs)."""
    from PIL import Image

    from shared.fashion_mnist import FASHION_MNIST_CLASSES
    from shared.detection.records import DetectionRecord, DetectionSplit
    from shared.progress import progress_bar

    folder = args.out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{split}_*.png"):  # from an earlier, larger run: not in the new annotations
        stale.unlink()
    rng = np.random.default_rng([args.seed, SPLITS[split]])
    records = []
    for i in progress_bar(range(count), desc=f"{split} images", unit="img", disable=args.no_progress):
        image, boxes, classes = compose(rng, items, labels, args)
        path = folder / f"{split}_{i:06d}.png"
        Image.fromarray(image).save(path)
        records.append(DetectionRecord(str(path), args.size, args.size, boxes, classes, name=path.stem))
    return DetectionSplit(records, list(FASHION_MNIST_CLASSES), f"{args.out} {split}")


def run(args: argparse.Namespace) -> None:
    from shared.durable import disk_space_checked
    from shared.locks import folder_writer

    check_args(args)
    # One run writes OUT at a time (a second one stops, naming the first); a full disk is one line.
    with folder_writer(args.out), disk_space_checked(args.out):
        write_dataset(args)


def write_dataset(args: argparse.Namespace) -> None:
    from shared.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, read_idx
    from shared.detection import coco, label_map, tfod, voc
    from shared.errors import UserError

    wanted = {"train": args.train, "test": args.test}
    splits = {}
    for split, count in wanted.items():
        images_file, labels_file = FASHION_MNIST_FILES[split]
        if not (args.fashion_dir / images_file).is_file():
            raise UserError(f"Fashion-MNIST not found: no {images_file} in {args.fashion_dir}; install it with "
                            f"`apt-get install dataset-fashion-mnist` or pass --fashion-dir")
        items, labels = read_idx(args.fashion_dir / images_file), read_idx(args.fashion_dir / labels_file)
        splits[split] = make_split(split, count, items, labels, args)
        coco.write_coco(splits[split], args.out / "annotations" / f"{split}.json", args.out / "images")
        if args.tfrecord:
            tfod.write_tfod_records(splits[split], args.out / "tfrecord" / f"{split}.tfrecord",
                                    FASHION_MNIST_CLASSES)
        if args.voc:
            voc.write_voc(splits[split], args.out / "voc", split)
    if args.tfrecord:
        label_map.write_label_map(args.out / "tfrecord" / "label_map.pbtxt", FASHION_MNIST_CLASSES)
    if args.voc:
        (args.out / "voc" / "labels.txt").write_text("".join(f"{name}\n" for name in FASHION_MNIST_CLASSES))
    boxes = {split: data.num_boxes for split, data in splits.items()}
    print(f"wrote {args.train} train ({boxes['train']} boxes) and {args.test} test ({boxes['test']} boxes) "
          f"{args.size}x{args.size} {'RGB' if args.rgb else 'grayscale'} images to {args.out}; train with "
          f"detection.format: coco, detection.train_annotations: {args.out}/annotations/train.json, "
          f"detection.test_annotations: {args.out}/annotations/test.json, data.path: {args.out}/images, "
          f"data.channels: {3 if args.rgb else 1}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from shared.errors import run_cli

    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
