"""Convert one's own detection labels (COCO JSON, Pascal VOC folders, or a CSV as annotation tools export it) into
TF Object Detection API TFRecord shards plus label_map.pbtxt, the `detection.format: tfrecord` input.

    python scripts/make_detection_tfrecords.py --format coco instances.json --images DIR --out OUT
    python scripts/make_detection_tfrecords.py --format voc VOCROOT --split trainval --out OUT
    python scripts/make_detection_tfrecords.py --format csv labels.csv --images DIR --out OUT [--split validation]

The CSV has a header row naming the columns filename,width,height,class,xmin,ymin,xmax,ymax (any order, more
columns ignored) and one row per box in absolute pixels; a row whose class and box are empty lists an image
without objects. Each run writes one split: OUT/<split>-00000-of-0000N (--split train, the default, with
--train-shards; any other split with --val-shards) and OUT/label_map.pbtxt (ids 1, 2, ... for the sorted class
names, or the order of --classes FILE; a later split reuses the label map already in OUT). Records are shuffled
with --seed, so that the shards mix images of every class.

Bad input (a CSV row with a bad number, a box outside its image, an unknown class, a missing or mis-sized image
file; an XML that does not parse) is named on one line each, by CSV line or by file, and its image left out;
--strict stops at the first instead. A COCO JSON is one file: a problem inside it stops the run.
Interrupted? Run the same command again: complete shards are kept, the rest written, the output is the same.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

CSV_COLUMNS = ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")
LABEL_MAP = "label_map.pbtxt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the COCO JSON, the VOC root (holding Annotations/) or the CSV")
    parser.add_argument("--format", required=True, choices=("coco", "voc", "csv"), help="what SOURCE is")
    parser.add_argument("--images", type=Path,
                        help="folder the COCO file_name / CSV filename entries are relative to (default: SOURCE's "
                             "folder; VOC: SOURCE/JPEGImages)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards and label_map.pbtxt")
    parser.add_argument("--split", default="train",
                        help="the split written, the shards' prefix (default train); for VOC also the image set "
                             "under ImageSets/Main/ when there is one (else every XML)")
    parser.add_argument("--train-shards", type=int, default=10, help="shards for the train split (default 10)")
    parser.add_argument("--val-shards", type=int, default=1, help="shards for any other split (default 1)")
    parser.add_argument("--classes", type=Path,
                        help="class list fixing the label order: one name a line, or a label_map.pbtxt")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row or file instead of "
                                                              "leaving its image out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the record order (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


class Problems:
    """Bad input: raised at once with --strict, else printed one line each and counted."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.lines: list[str] = []

    def report(self, message: str) -> None:
        from shared.errors import UserError

        if self.strict:
            raise UserError(message)
        self.lines.append(message)
        print(f"skipped: {message}", flush=True)


# ---------------------------------------------------------------- reading the three formats


def read_csv_labels(path: Path, images: Path, problems: Problems):
    """The CSV's images as a DetectionSplit (classes: the sorted names found), and where each image's first row
    is (`path line N`, by filename); a bad row leaves its image out."""
    import numpy as np

    from shared.detection.records import DetectionRecord, DetectionSplit, check_box
    from shared.errors import UserError

    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # Excel writes a byte order mark
    except OSError as error:
        raise UserError(f"cannot read the CSV {path} ({error.strerror or error}); pass the labels' CSV") from None
    entries: dict[str, dict] = {}  # filename -> width, height, line, boxes, names; None once a row was bad
    with handle:
        reader = csv.DictReader(handle)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        missing = [column for column in CSV_COLUMNS if column not in header]
        if missing:
            raise UserError(f"{path} line 1: the header has no column {missing[0]} (it has {','.join(header)}); "
                            f"name the columns {','.join(CSV_COLUMNS)}")
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            where = f"{path} line {line}"
            filename = (row.get("filename") or "").strip()
            if not filename:
                problems.report(f"{where}: no filename; give the image file's name")
                continue
            entry = entries.setdefault(filename, {"line": line, "boxes": [], "names": [], "bad": False})
            try:
                entry.update(_csv_row(row, where, entry, check_box))
            except UserError as error:
                entry["bad"] = True
                problems.report(str(error))
    kept = {filename: entry for filename, entry in entries.items() if not entry["bad"]}
    names = sorted({name for entry in kept.values() for name in entry["names"]})
    records = [DetectionRecord(str(images / filename), entry["width"], entry["height"],
                               np.array(entry["boxes"], np.float32).reshape(-1, 4),
                               np.array([names.index(name) for name in entry["names"]], np.int32),
                               name=filename)
               for filename, entry in kept.items()]
    lines = {filename: f"{path} line {entry['line']}" for filename, entry in kept.items()}
    return DetectionSplit(records, names, str(path)), lines


def _csv_row(row: dict, where: str, entry: dict, check_box) -> dict:
    """One CSV row checked: the image size (the same on every row of an image) and its box, if any."""
    from shared.errors import UserError

    numbers = {}
    for column in ("width", "height"):
        text = (row.get(column) or "").strip()
        try:
            numbers[column] = int(float(text))
            if numbers[column] <= 0 or numbers[column] != float(text):
                raise ValueError
        except ValueError:
            raise UserError(f"{where}: {column} {text!r} is not a positive whole number; fix the row") from None
    if "width" in entry and (entry["width"], entry["height"]) != (numbers["width"], numbers["height"]):
        raise UserError(f"{where}: the image is {numbers['width']}x{numbers['height']} here but "
                        f"{entry['width']}x{entry['height']} on line {entry['line']}; give one size per image")
    name = (row.get("class") or "").strip()
    texts = [(row.get(column) or "").strip() for column in ("xmin", "ymin", "xmax", "ymax")]
    if not name and not any(texts):
        return numbers  # an image without objects
    if not name:
        raise UserError(f"{where}: the box has no class; fill in the class column")
    box = []
    for column, text in zip(("xmin", "ymin", "xmax", "ymax"), texts):
        try:
            box.append(float(text))
        except ValueError:
            raise UserError(f"{where}: {column} {text!r} is not a number; fix the row") from None
    box = check_box(box, numbers["width"], numbers["height"], where,
                    "fix the box (absolute pixels, xmax > xmin, ymax > ymin) or remove the row")
    entry["boxes"].append(box)
    entry["names"].append(name)
    return numbers


def read_source(args: argparse.Namespace, problems: Problems):
    """The annotations of SOURCE as a DetectionSplit, and where each record came from (by name) when that is
    finer than SOURCE (a CSV line); image files are checked later, per image."""
    from shared.detection.coco import read_coco
    from shared.detection.voc import read_voc
    from shared.errors import UserError

    source = args.source.expanduser()
    if args.format == "coco":
        return read_coco(source, args.images or source.parent, check_files=False), {}
    if args.format == "csv":
        return read_csv_labels(source, args.images or source.parent, problems)
    image_set = args.split if (source / "ImageSets" / "Main" / f"{args.split}.txt").is_file() else None
    skipped: list[str] = []
    try:
        split = read_voc(source, image_set, check_files=False, skipped=None if problems.strict else skipped)
    finally:
        for message in skipped:
            problems.report(message)
    if args.images:
        for record in split.records:
            record.image = str(args.images / Path(record.image).name)
    for record in split.records:
        record.name = Path(record.image).name  # image/filename, as the API's VOC converter stores it
    if not split.records:
        raise UserError(f"no VOC annotation in {source} could be read; fix the XML files named above")
    return split, {}


# ---------------------------------------------------------------- classes, images, order


def class_list(args: argparse.Namespace, found: list[str]) -> list[str]:
    """--classes, else the label map a first split left in OUT, else the sorted names found."""
    from shared.detection.label_map import read_class_list

    if args.classes:
        return read_class_list(args.classes)
    if (args.out / LABEL_MAP).is_file():
        return read_class_list(args.out / LABEL_MAP)
    return sorted(found)


def checked_records(split, class_names: list[str], problems: Problems, source: str, lines: dict[str, str]
                    ) -> list[tuple]:
    """(record, 1-based labels, class texts) of each usable image: its file there with the stated size, its
    classes in the list."""
    from shared.detection.records import image_size_problem

    position = {name: i for i, name in enumerate(class_names)}
    usable = []
    for record in split.records:
        where = lines.get(record.name) or f"{source}: image {record.name}"
        names = [split.class_names[c] for c in record.classes.tolist()]
        unknown = [name for name in names if name not in position]
        if unknown:
            problems.report(f"{where}: class {unknown[0]!r} is not in the class list ({len(class_names)} classes); "
                            f"add it to --classes or fix the label")
            continue
        if not os.path.isfile(record.image):
            problems.report(f"{where}: image file {record.image} not found; pass --images, the folder it is in")
            continue
        problem = image_size_problem(record.image, record.width, record.height, "the labels state")
        if problem:
            problems.report(f"{where}: image {record.image} {problem}; fix the size or replace the image")
            continue
        usable.append((record, [position[name] + 1 for name in names], names))
    return usable


def plan_digest(usable: list[tuple], class_names: list[str], num_shards: int) -> str:
    """What goes where: class list, shard count and every record's image name, size, boxes and labels, in
    order (a rerun that would write other shards is refused, not mixed in)."""
    digest = hashlib.sha256(f"{num_shards}\n{class_names}\n".encode())
    for record, labels, _ in usable:
        digest.update(f"{record.name}\t{Path(record.image).name}\t{record.width}x{record.height}\t"
                      f"{record.boxes.round(3).tolist()}\t{labels}\t{record.difficult.astype(int).tolist()}\n"
                      .encode())
    return digest.hexdigest()


def write_label_map_once(path: Path, class_names: list[str]) -> None:
    """label_map.pbtxt, refusing to change the classes of shards written before."""
    from shared.detection.label_map import read_class_list, write_label_map
    from shared.durable import partial_path
    from shared.errors import UserError

    if path.is_file():
        if read_class_list(path) != class_names:
            raise UserError(f"{path} lists other classes than the {len(class_names)} given now; the shards there "
                            f"have other labels: delete that folder's contents or write to another one")
        return
    with partial_path(path) as partial:
        write_label_map(partial, class_names)


def run(args: argparse.Namespace) -> None:
    from shared.data.tfrecord import write_example_shards
    from shared.detection.tfod import tfod_example
    from shared.errors import UserError
    from shared.locks import folder_writer

    for flag, value in (("--train-shards", args.train_shards), ("--val-shards", args.val_shards)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    if not args.source.expanduser().exists():
        raise UserError(f"{args.format} labels not found: {args.source}; pass the COCO JSON, VOC root or CSV")
    problems = Problems(args.strict)
    split, lines = read_source(args, problems)
    class_names = class_list(args, split.class_names)
    usable = checked_records(split, class_names, problems, str(args.source), lines)
    if not usable:
        raise UserError(f"no image of {args.source} is usable; fix the problems named above")
    random.Random(args.seed).shuffle(usable)
    num_shards = args.train_shards if args.split == "train" else args.val_shards
    if num_shards > len(usable):
        print(f"{args.split}: {len(usable)} images, fewer than {num_shards} shards: writing {len(usable)} shards")
        num_shards = len(usable)
    args.out.mkdir(parents=True, exist_ok=True)
    with folder_writer(args.out):
        write_label_map_once(args.out / LABEL_MAP, class_names)
        shards = write_example_shards(len(usable), lambda j: tfod_example(*usable[j]),
                                      plan_digest(usable, class_names, num_shards), args.out, args.split,
                                      num_shards, progress=not args.no_progress)
    boxes = sum(len(record.classes) for record, _, _ in usable)
    print(f"{args.split}: {len(usable)} images, {boxes} boxes of {args.source} in {num_shards} shards "
          f"{args.out}/{args.split}-*-of-{num_shards:05d} (wrote {len(shards) - len(shards.reused)}, kept "
          f"{len(shards.reused)} complete{f', left out {len(problems.lines)} bad' if problems.lines else ''})")
    print(f"labels: {args.out / LABEL_MAP} ({len(class_names)} classes, ids 1..{len(class_names)}); train with "
          f"detection.format: tfrecord, detection.train_annotations: {args.out}/{args.split}-*", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from shared.errors import run_cli  # after argparse, so --help answers before TF loads

    return run_cli(lambda: run(args),
                   interrupted="interrupted; run the same command again to finish (complete shards are kept)")


if __name__ == "__main__":
    sys.exit(main())
