"""TFRecord shards of encoded images in the layout TF Model Garden uses for ImageNet classification.

Each record is a `tf.train.Example` with the Model Garden keys (`FEATURES`): the file's own bytes, unchanged,
under `image/encoded`, its `image/format`, the 0-based `image/class/label`, and the class folder name
(`image/class/synset`, the WordNet id for ImageNet), height and width. Shards are named like Model Garden's
(`train-00000-of-01024`, `validation-00000-of-00128`), so its shards and these read the same way.

Labels: these shards are 0-based, 1000 classes for ImageNet (the sorted WordNet ids). The ImageNet shards most
Model Garden users have come from TF's older converters (the TPU `tools/datasets/imagenet_to_gcs.py`, TF-slim's
`build_imagenet_data.py`), which numbered the sorted synsets from 1, leaving 0 for "background" (hence the
`num_classes: 1001` of Model Garden's ImageNet configs). Read such shards with `read_dataset(..., label_offset=-1)`;
applied to 0-based shards, it stops the read at the first class-0 record (a label below 0), naming the shard.

    shards = write_shards(files, labels, synsets, Path("out"), "train", num_shards=1024)
    dataset = read_dataset("out/train-*")      # (encoded bytes, int32 label), decode with formats.decode
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

import tensorflow as tf

from shared.config_schema import DataConfig
from shared.data import checks
from shared.durable import atomic_write, partial_path
from shared.errors import UserError
from shared.locks import folder_writer

DEFAULT_QUALITY = 90  # --max-side's JPEG quality

AUTOTUNE = tf.data.AUTOTUNE

# The Model Garden keys, as a `tf.io.parse_single_example` spec; the optional ones have defaults.
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature((), tf.string),
    "image/format": tf.io.FixedLenFeature((), tf.string, default_value="jpeg"),
    "image/class/label": tf.io.FixedLenFeature((), tf.int64),
    "image/class/synset": tf.io.FixedLenFeature((), tf.string, default_value=""),
    "image/height": tf.io.FixedLenFeature((), tf.int64, default_value=-1),
    "image/width": tf.io.FixedLenFeature((), tf.int64, default_value=-1),
}
# What the reader parses: only what training needs.
READ_FEATURES = {key: FEATURES[key] for key in ("image/encoded", "image/class/label")}

SKIP_HINT = "fix or remove it, or skip such files with skip_corrupt=True (--skip-corrupt)"


class Shards(list):
    """The shard paths `write_shards` returns (a plain `list[Path]`), plus what it skipped."""

    def __init__(self, paths: Iterable[Path] = (), corrupt: list[str] | None = None,
                 reused: list[Path] | None = None):
        super().__init__(paths)
        self.corrupt = corrupt or []  # unreadable image files left out (skip_corrupt=True)
        self.reused = reused or []  # shards that already existed complete and were not rewritten


# ---------------------------------------------------------------- writing


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def read_image_file(path: str, max_pixels: int | None = DataConfig.max_pixels,
                    max_bytes: int = DataConfig.max_image_bytes) -> tuple[bytes, str, int, int]:
    """The file's bytes, its format (`image/format`), its height and width as shown. Raises UserError naming the
    file when it cannot be read (only a regular file of at most `max_bytes`: `listing.read_image_bytes`), is
    refused by the formats table (`shared.data.formats`: the decoder training uses) or does not decode (a
    truncated JPEG, say): JPEGs decode at 1/8 scale, which reads every byte. The error says no fix: its
    caller's way to skip such files differs."""
    from shared.data import formats
    from shared.data.listing import UnreadableFile, read_image_bytes

    try:
        data = read_image_bytes(path, max_bytes)
        found = formats.verify(data, max_pixels)
    except (UnreadableFile, formats.Refused) as why:
        raise UserError(f"image file {path} {why}") from None
    return data, found.format, found.height, found.width


def example_from_file(path: str, label: int, synset: str | None, max_pixels: int | None = DataConfig.max_pixels,
                      max_side: int | None = None, quality: int = DEFAULT_QUALITY) -> tf.train.Example:
    """One Model Garden record from an image file: its raw bytes (no re-encoding), the format read from the
    content (a PNG named .JPEG gets `png`), height, width (as shown), label and, when given, the synset. With
    `max_side`, an image longer than that on its long side is stored re-encoded (`bounded`)."""
    data, image_format, height, width = read_image_file(path, max_pixels)
    if max_side is not None and max(height, width) > max_side:
        data, height, width = bounded(data, max_side, quality)
        image_format = "jpeg"
    return image_example(data, image_format, height, width, label, synset)


def bounded(data: bytes, max_side: int, quality: int = DEFAULT_QUALITY) -> tuple[bytes, int, int]:
    """An image as shown (its EXIF orientation applied, first frame, RGB) resized to `max_side` on its long side
    (area-averaged: antialiased) and encoded as a JPEG of `quality`: (bytes, height, width). A training decode
    then costs what the model needs, not what the camera took (FFCV's max_resolution)."""
    encoded, height, width = _bounded_fn(max_side, quality)(tf.constant(data))
    return encoded.numpy(), int(height), int(width)


@functools.cache
def _bounded_fn(max_side: int, quality: int):
    from shared.data import formats

    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
    def run(data):
        image = formats.decode(data, 3)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        size = tf.maximum(1, tf.cast(tf.round(shape * (max_side / tf.reduce_max(shape))), tf.int32))
        resized = tf.image.resize(image, size, method="area")
        pixels = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
        return tf.io.encode_jpeg(pixels, quality=quality), size[0], size[1]
    return run


def image_example(data: bytes, image_format: str, height: int, width: int, label: int,
                  synset: str | None) -> tf.train.Example:
    """One Model Garden record from an encoded image (`image_format` as TF names it: jpeg, png, ...)."""
    feature = {
        "image/encoded": _bytes(data),
        "image/format": _bytes(image_format.encode()),
        "image/class/label": _int64(int(label)),
        "image/height": _int64(height),
        "image/width": _int64(width),
    }
    if synset is not None:
        feature["image/class/synset"] = _bytes(synset.encode())
    return tf.train.Example(features=tf.train.Features(feature=feature))


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    """`train-00000-of-01024`, as Model Garden names shards."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}"


def _plan_digest(files: list[str], labels: list[int], synsets: list[str] | None, num_shards: int,
                 encoding: str = "") -> str:
    """A digest of what goes where: file (class folder and name, so moving the dataset does not change it),
    label and synset in order, the shard count and how images are stored (`encoding`: empty for their own
    bytes, the shards of earlier releases)."""
    digest = hashlib.sha256(f"{num_shards}\n".encode() + (f"{encoding}\n".encode() if encoding else b""))
    for i, (path, label) in enumerate(zip(files, labels)):
        name = "/".join(Path(path).parts[-2:])
        # a file name that is not UTF-8 (its bytes as surrogate escapes) is hashed as its bytes
        digest.update(f"{name}\t{label}\t{synsets[i] if synsets else ''}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _check_resume(output_dir: Path, prefix: str, num_shards: int, digest: str) -> None:
    """Refuse to mix shards of another sharding or another image list into this one."""
    existing = sorted(output_dir.glob(f"{prefix}-?????-of-?????"))
    other = [path for path in existing if not path.name.endswith(f"-of-{num_shards:05d}")]
    if other:
        raise UserError(f"{output_dir} already holds {prefix} shards of another shard count ({other[0].name}); "
                        f"delete {output_dir}/{prefix}-* or write to another folder")
    plan = output_dir / f".{prefix}.plan"
    if existing and plan.is_file() and plan.read_text(encoding="utf-8").strip() != digest:
        raise UserError(f"the {prefix} shards in {output_dir} were written from another image list (or order); "
                        f"delete {output_dir}/{prefix}-* to rewrite them, or write to another folder")
    atomic_write(plan, digest + "\n")


def _remove_partial_shards(output_dir: Path, prefix: str) -> None:
    """Shards a killed writer left half-written (their temporary names); only the folder's writer calls this."""
    for pattern in (f".partial-*-{prefix}-?????-of-?????", f".{prefix}-?????-of-?????.partial"):
        for path in output_dir.glob(pattern):
            path.unlink(missing_ok=True)


def write_shards(files: list[str], labels: list[int], synsets: list[str] | None, output_dir: Path,
                 prefix: str, num_shards: int, progress: bool = True, skip_corrupt: bool = False,
                 max_pixels: int | None = DataConfig.max_pixels, max_side: int | None = None,
                 quality: int = DEFAULT_QUALITY) -> Shards:
    """Write `files` (in the caller's order: shuffle first) as `num_shards` contiguous chunks named
    `{prefix}-{i:05d}-of-{num_shards:05d}` in `output_dir`, and return their paths (a `Shards` list, whose
    `.corrupt` names the unreadable files skipped and `.reused` the shards kept from an earlier run).

    Resumable: each shard is written under a temporary name and renamed when complete, and a shard whose final
    name exists is kept, not rewritten. A rerun must list the same files in the same order (checked against a
    digest in `output_dir/.{prefix}.plan`). An unreadable image raises UserError naming it, unless
    `skip_corrupt`, which leaves it out, counts it and prints the count; an image above `max_pixels` (read from
    its header) is refused the same way, as training would refuse it. One process writes a folder at a
    time (`shared.locks.folder_writer`: another gets a UserError naming it); a full disk is a DiskFull naming
    the shard, which is not left behind. `max_side`: images longer than that on their long side are stored
    re-encoded at that size, as JPEGs of `quality` (`bounded`); the plan's digest holds both, so a rerun with
    other values is refused rather than mixing shards of two sizes.
    """
    if len(files) != len(labels) or (synsets is not None and len(synsets) != len(files)):
        raise ValueError("files, labels and synsets must have the same length")
    corrupt: list[str] = []

    def example_at(j: int) -> tf.train.Example | None:
        try:
            return example_from_file(files[j], labels[j], synsets[j] if synsets else None, max_pixels, max_side,
                                     quality)
        except UserError as why:
            if not skip_corrupt:
                raise UserError(f"{why}; {SKIP_HINT}") from None
            corrupt.append(files[j])
            return None

    digest = _plan_digest(files, labels, synsets, num_shards, "" if max_side is None else f"{max_side}:{quality}")
    shards = write_example_shards(len(files), example_at, digest, output_dir, prefix, num_shards, progress)
    if corrupt:
        print(f"{prefix}: skipped {len(corrupt)} unreadable image file(s), first {corrupt[0]}", flush=True)
    shards.corrupt = corrupt
    return shards


def write_example_shards(count: int, example_at: Callable[[int], tf.train.Example | None], plan_digest: str,
                         output_dir: Path, prefix: str, num_shards: int, progress: bool = True) -> Shards:
    """The resumable shard writer behind `write_shards`, for any record kind: items 0..count-1, in order, as
    `num_shards` contiguous chunks; `example_at(j)` makes item j's record (None: leave it out). `plan_digest`
    names what goes where (a rerun with another digest is refused); complete shards are kept, half-written ones
    of a killed writer removed, one process writes the folder at a time."""
    if num_shards < 1:
        raise UserError(f"the number of {prefix} shards must be at least 1, not {num_shards}")
    if num_shards > count:
        raise UserError(f"{num_shards} {prefix} shards for {count} images would leave shards empty; "
                        f"ask for at most {count} shards")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with folder_writer(output_dir):
        return _write_example_shards(count, example_at, plan_digest, output_dir, prefix, num_shards, progress)


def _write_example_shards(count: int, example_at: Callable[[int], tf.train.Example | None], plan_digest: str,
                          output_dir: Path, prefix: str, num_shards: int, progress: bool) -> Shards:
    from shared.progress import progress_bar

    _check_resume(output_dir, prefix, num_shards, plan_digest)
    _remove_partial_shards(output_dir, prefix)

    bounds = [count * i // num_shards for i in range(num_shards + 1)]
    paths = [output_dir / shard_name(prefix, i, num_shards) for i in range(num_shards)]
    todo = [i for i in range(num_shards) if not paths[i].exists()]
    reused = [paths[i] for i in range(num_shards) if paths[i].exists()]
    if reused:
        print(f"{prefix}: skipped {len(reused)} of {num_shards} shards already complete in {output_dir} "
              f"({reused[0].name}{' ...' if len(reused) > 1 else ''}); delete them to rewrite them", flush=True)
    done_images = count - sum(bounds[i + 1] - bounds[i] for i in todo)
    with progress_bar(total=count, initial=done_images, desc=f"{prefix} shards", unit="img",
                      disable=not progress, smoothing=0.05) as bar:
        for i in todo:
            with partial_path(paths[i]) as temporary, tf.io.TFRecordWriter(str(temporary)) as writer:
                for j in range(bounds[i], bounds[i + 1]):
                    example = example_at(j)
                    if example is not None:  # map keys sorted: a rerun writes the same bytes
                        writer.write(example.SerializeToString(deterministic=True))
                    bar.update(1)
    return Shards(paths, reused=reused)


# ---------------------------------------------------------------- reading


def resolve_files(pattern_or_files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """A glob pattern (`out/train-*`) or a list of shard paths -> the sorted, existing shard files.
    Raises UserError when nothing matches or a listed file is missing."""
    hint = "write them with scripts/make_tfrecords.py"
    if isinstance(pattern_or_files, (str, os.PathLike)):
        pattern = os.fspath(pattern_or_files)
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise UserError(f"no TFRecord files match {pattern}; {hint}")
        return files
    files = [os.fspath(path) for path in pattern_or_files]
    if not files:
        raise UserError(f"no TFRecord files given (an empty list); {hint}")
    missing = [path for path in files if not tf.io.gfile.exists(path)]
    if missing:
        raise UserError(f"no TFRecord files match {missing[0]}"
                        f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}; {hint}")
    return files


def read_dataset(pattern_or_files: str | os.PathLike | Iterable[str | os.PathLike], label_offset: int = 0,
                 shuffle_files: bool = False, seed: int | None = None, cycle_length: int = 8,
                 deterministic: bool = True, num_classes: int | None = None,
                 check_labels: bool = True) -> tf.data.Dataset:
    """`(encoded image bytes: tf.string scalar, label: tf.int32 scalar)` from Model Garden shards.

    Reads `cycle_length` shards at once, interleaved one record each (in parallel; with `deterministic` the
    order is fixed by the file order, else records come as soon as read). `shuffle_files` reshuffles the shard
    order each epoch (with `seed`); records within a shard keep their order, so shuffle the records too.
    `label_offset` is added to every label: -1 reads 1-based shards (1001 classes, 0 = background) as 0-based.
    A label outside [0, `num_classes`) (below 0 when `num_classes` is None) fails the read when it is reached,
    with a one-line message naming the shard and the label (`shared.data.checks`): the shards are only seen
    while streaming, and a first pass over them all would cost as much as an epoch's reading
    (`check_labels=False`: unchecked, for a pipeline that applies `label_check` itself). Decode with
    `shared.data.formats.decode`, which reads the formats of its table whatever the file was named.
    """
    files = resolve_files(pattern_or_files)
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def records_of(shard):  # each record with its shard's name, for the label check's message
        return tf.data.TFRecordDataset(shard).map(lambda record: (record, shard))

    dataset = dataset.interleave(records_of, cycle_length=max(1, min(cycle_length, len(files))),
                                 block_length=1, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    checked = label_check(label_offset, num_classes)

    def parse(record, shard):
        example = tf.io.parse_single_example(record, READ_FEATURES)
        label = tf.cast(example["image/class/label"] + label_offset, tf.int32)
        return example["image/encoded"], (checked(label, shard) if check_labels else label)

    return dataset.map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def label_check(label_offset: int = 0, num_classes: int | None = None):
    """`checked(label, shard=None)`: the label (after `label_offset`), with an op that fails in one line, naming
    the shard when given, if it falls outside the classes. read_dataset applies it per record; with
    `check_labels=False` a pipeline applies it later (data.on_corrupt: skip checks labels after dropping the
    images that fail to decode, so that a wrong label is never taken for a damaged image)."""
    after = f" after label_offset={label_offset}" if label_offset else ""
    allowed = "below 0" if num_classes is None else f"outside 0-{num_classes - 1} for {num_classes} classes"
    rewrite = "rewrite the shards (or labels.txt) with scripts/make_tfrecords.py"
    # The likely fix depends on the side the label falls off: no offset for 0-based shards, -1 for 1-based.
    below = "the shards are 0-based: set data.label_offset: 0" if label_offset < 0 else rewrite
    above = (f"shards numbered from 1 (0 = background) need data.label_offset: -1, else {rewrite}"
             if label_offset == 0 else rewrite)

    def checked(label: tf.Tensor, shard: tf.Tensor | None = None) -> tf.Tensor:
        valid = (label >= 0) if num_classes is None else (label >= 0) & (label < num_classes)
        where = ("TFRecord shard ", shard, " holds") if shard is not None else ("a TFRecord example holds",)
        check = checks.check(valid, *where, " image/class/label ", label - label_offset,
                             f"{after}, {allowed}; ", tf.where(label < 0, below, above))
        with tf.control_dependencies([check]):
            return tf.identity(label)

    return checked


def read_labels(path: str | os.PathLike) -> list[str]:
    """The class names of `labels.txt` (one a line, label order), as scripts/make_tfrecords.py writes it."""
    path = os.fspath(path)
    if not tf.io.gfile.exists(path):
        raise UserError(f"no class list {path}; write the shards and labels.txt with scripts/make_tfrecords.py")
    with tf.io.gfile.GFile(path) as handle:
        names = [line.strip() for line in handle if line.strip()]
    if not names:
        raise UserError(f"{path} lists no classes; rewrite it with scripts/make_tfrecords.py")
    return names


def count_records(files: str | os.PathLike | Iterable[str | os.PathLike]) -> int:
    """The number of records in the shards (a pattern or a list). Reads every file once, start to end
    (parallel, no parsing): seconds for a validation split, minutes for ImageNet's 140 GB train split."""
    dataset = tf.data.TFRecordDataset(resolve_files(files), num_parallel_reads=AUTOTUNE)
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
