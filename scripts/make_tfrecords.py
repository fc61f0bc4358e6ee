"""Write a folder dataset (SRC/train/<class>/*, SRC/val/<class>/*) as TFRecord shards in TF Model Garden's
ImageNet layout: OUT/train-00000-of-01024 ..., OUT/validation-00000-of-00128 ..., and OUT/labels.txt (the class
folder names, one a line, in label order: label 0 is the first line).

    python scripts/make_tfrecords.py SRC OUT [--train-shards 1024] [--val-shards 128] [--splits train val]
                                             [--skip-corrupt] [--max-side 320 [--quality 90]]

Labels are 0-based, classes the sorted folder names of SRC/train (shared by every split); the images keep
their bytes (no re-encoding; with --max-side N, an image longer than N on its long side is stored resized to N
there, as a JPEG of --quality, recorded in OUT/encoding.json) and go into the shards in the same fixed,
class-mixed order the `folder` source uses. Interrupted? Run the same command again: complete shards are kept,
the rest written. A second run into the same OUT while one is writing there stops at once, naming the process
that writes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

# Split folder -> shard prefix (Model Garden's names); other folders keep their own name.
PREFIXES = {"train": "train", "val": "validation", "validation": "validation"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="folder dataset: SRC/<split>/<class>/<image>")
    parser.add_argument("out", type=Path, help="output folder for the shards and labels.txt")
    parser.add_argument("--train-shards", type=int, default=1024, help="shards for the train split (default 1024)")
    parser.add_argument("--val-shards", type=int, default=128,
                        help="shards for every other split (default 128)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="split folders under SRC (default: train val); val is written as validation-*")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave out (and count) image files that do not decode, instead of stopping")
    parser.add_argument("--max-pixels", type=int, default=100_000_000,
                        help="refuse images above this many pixels, as training's data.max_pixels does "
                             "(default 100000000)")
    parser.add_argument("--max-side", type=int, metavar="N",
                        help="store images longer than N px on their long side resized to N (as JPEG), so training "
                             "decodes what it needs (e.g. 320 for 224 px training); default: their own bytes")
    parser.add_argument("--quality", type=int, default=90, help="--max-side: the JPEG quality (default 90)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def class_names_of(src: Path, first_split: str) -> list[str]:
    """Sorted class folder names of SRC/train (or of the first split when there is no train folder)."""
    from shared.errors import UserError

    split_dir = src / "train" if (src / "train").is_dir() else src / first_split
    names = sorted(path.name for path in split_dir.iterdir() if path.is_dir()) if split_dir.is_dir() else []
    if not names:
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    return names


def write_labels(path: Path, class_names: list[str]) -> None:
    """labels.txt, refusing to change the classes of shards written before."""
    from shared.durable import atomic_write
    from shared.errors import UserError

    text = "".join(f"{name}\n" for name in class_names)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        raise UserError(f"{path} lists other classes than {len(class_names)} class folders found now; the "
                        f"shards there have other labels: delete that folder's contents or write to another one")
    atomic_write(path, text)


def run(args: argparse.Namespace) -> None:
    from shared.errors import UserError

    if not args.src.is_dir():
        raise UserError(f"folder dataset not found: {args.src}; pass a folder with train/<class>/ images")
    for flag, value in (("--train-shards", args.train_shards), ("--val-shards", args.val_shards)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    if args.max_side is not None and args.max_side < 16:
        raise UserError(f"--max-side must be at least 16 px, not {args.max_side}")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be 1-100, not {args.quality}")
    prefixes = [PREFIXES.get(split, split) for split in args.splits]
    if len(set(prefixes)) != len(prefixes):
        raise UserError(f"--splits {' '.join(args.splits)} names one split twice; give each split once")

    class_names = class_names_of(args.src, args.splits[0])
    from shared.locks import folder_writer

    with contextlib.ExitStack() as held:
        # Another run writing OUT: stop at once, before listing the images (minutes for ImageNet) and
        # before touching its files. A folder not there yet is made (and held) once the images check out.
        if args.out.is_dir():
            held.enter_context(folder_writer(args.out))
        from shared.data.sources import list_folder_split  # TensorFlow loads here, after the cheap checks

        listed = {split: list_folder_split(args.src, split, class_names) for split in args.splits}  # check all
        args.out.mkdir(parents=True, exist_ok=True)
        held.enter_context(folder_writer(args.out))
        write_all(args, class_names, prefixes, listed)


def write_all(args: argparse.Namespace, class_names: list[str], prefixes: list[str], listed: dict) -> None:
    from shared.data.tfrecord import write_shards

    write_labels(args.out / "labels.txt", class_names)
    for split, prefix in zip(args.splits, prefixes):
        files, labels, _ = listed[split]
        num_shards = args.train_shards if split == "train" else args.val_shards
        if num_shards > len(files):
            print(f"{prefix}: {len(files)} images, fewer than {num_shards} shards: writing {len(files)} shards")
            num_shards = len(files)
        shards = write_shards(files, labels, [class_names[label] for label in labels], args.out, prefix,
                              num_shards, progress=not args.no_progress, skip_corrupt=args.skip_corrupt,
                              max_pixels=args.max_pixels, max_side=args.max_side, quality=args.quality)
        written = len(shards) - len(shards.reused)
        print(f"{prefix}: {len(files) - len(shards.corrupt)} images of {args.src / split} in {num_shards} shards "
              f"{args.out}/{prefix}-*-of-{num_shards:05d} (wrote {written}, kept {len(shards.reused)} complete"
              f"{f', skipped {len(shards.corrupt)} unreadable' if shards.corrupt else ''})", flush=True)
    print(f"labels: {args.out / 'labels.txt'} ({len(class_names)} classes, label = line number - 1)")
    write_encoding(args.out, args.max_side, args.quality)
    write_counts(args.out, prefixes)


def write_encoding(out: Path, max_side: int | None, quality: int) -> None:
    """encoding.json: how the images are stored (their own bytes, or bounded to max_side as JPEGs of quality), so
    a reader knows what a decode costs and which quality it trains on. Written once every split's shards are, whose
    plans refuse a rerun with other values (shared.data.tfrecord.write_shards) before any shard is written."""
    import json

    from shared.durable import atomic_write

    record = ({"images": "as they are (their own bytes)"} if max_side is None else
              {"images": "re-encoded where longer than max_side", "max_side": max_side, "format": "jpeg",
               "quality": quality, "resize": "area (antialiased), EXIF orientation applied"})
    atomic_write(out / "encoding.json", json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_counts(out: Path, prefixes: list[str]) -> None:
    """counts.json: records per split, so training need not read a whole split to learn its size."""
    import json

    from shared.data.tfrecord import count_records, resolve_files
    from shared.durable import atomic_write

    path = out / "counts.json"
    counts = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for prefix in prefixes:
        counts[prefix] = count_records(resolve_files(str(out / f"{prefix}-*-of-*")))
    atomic_write(path, json.dumps(counts, indent=2, sort_keys=True) + "\n")
    print(f"counts: {path} {counts}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from shared.errors import run_cli  # after argparse, so --help answers before TF loads

    return run_cli(lambda: run(args),
                   interrupted="interrupted; run the same command again to finish (complete shards are kept)")


if __name__ == "__main__":
    sys.exit(main())
