"""Where images come from. Each source yields (image, label) `tf.data` datasets for a train and a test
split in a fixed, class-mixed order, plus what the pipeline needs to know about them.

Images are decoded uint8 arrays (`encoding=None`), or file paths (`"path"`) or encoded bytes (`"bytes"`)
decoded later inside the parallel map, fused with the crop. What each source is (its loader here, the
keys it requires, its kind of images) is its row of `shared.source_facts.SOURCES`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf

from shared.config_schema import DataConfig
from shared.data import checks
from shared.data import split as folder_split
from shared.data.listing import IMAGE_SUFFIXES, class_name, file_names, is_image_file, mix_classes, refused_by_name
from shared.errors import UserError
from shared.fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, FASHION_MNIST_FILES,
                                  FASHION_MNIST_MEAN, FASHION_MNIST_STD, read_split)
from shared.source_facts import SOURCES

IMAGENET_MEAN, IMAGENET_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


@dataclass
class Source:
    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    class_names: list[str]
    mean: list[float]  # default normalization statistics (0-255 scale, one per source channel)
    std: list[float]
    encoding: str | None = None  # None: decoded arrays; "path": image files; "bytes": encoded images
    fixed_size: bool = True  # decoded arrays of one square size: resized, not center-cropped (encoded: False)
    files: dict = field(default_factory=dict)  # split -> list of file paths, for error reports
    # a validation split of the source's own (split-less folders: stratified); None: make_datasets carves
    # data.val_fraction off the head of train
    val: tf.data.Dataset | None = None
    num_val: int = 0
    train_labels: list[int] | None = None  # the training labels in order, where known without reading images
    record: dict = field(default_factory=dict)  # files the run records ({run-relative path: bytes}): the split
    # labels -> the same labels failing in one line outside the classes, for make_datasets to apply after it
    # drops undecodable images (data.on_corrupt: skip); None: the datasets check their labels themselves
    label_check: Callable | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load(config: DataConfig, recorded: folder_split.RecordedSplit | None = None) -> Source:
    """The config's source; `recorded`: the split a run recorded (a split-less folder), read instead of
    splitting the folder again."""
    config = dataclasses.replace(config, **{key: os.path.expanduser(getattr(config, key))
                                            for key in ("path", "data_dir", "manual_dir") if getattr(config, key)})
    loader = globals()[SOURCES[config.source].loader]
    return loader(config, recorded) if recorded is not None and config.source == "folder" else loader(config)


# ---------------------------------------------------------------- fashion_mnist


def _fashion_mnist_dir(config: DataConfig) -> Path | None:
    candidates = [config.path] if config.path else list(FASHION_MNIST_DIRS)
    for candidate in candidates:
        folder = Path(candidate)
        if all((folder / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair):
            return folder
    return None


def fashion_mnist(config: DataConfig) -> Source:
    """The IDX files from data.path, else the Debian package's folder, else TFDS."""
    folder = _fashion_mnist_dir(config)
    if folder is None:
        looked = config.path or ", ".join(FASHION_MNIST_DIRS)
        try:
            import tensorflow_datasets as tfds
            builder = tfds.builder("fashion_mnist", data_dir=config.data_dir)
            if not builder.is_prepared():
                offline = unreachable(getattr(builder, "URL", None) or TFDS_STORAGE_URL)
                if offline:
                    raise ConnectionError(offline)
                builder.download_and_prepare()
        except Exception as error:  # no files and no download: say where we looked and how to get it
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            raise UserError(
                f"Fashion-MNIST not found: no IDX files (train-images-idx3-ubyte.gz ...) in {looked}, and the "
                f"TFDS download failed ({reason}); install it with "
                f"`apt-get install dataset-fashion-mnist` or set data.path to a folder with the four IDX files"
            ) from None
        return tfds_source(config, name="fashion_mnist", builder=builder,
                           mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    arrays = {}
    for split in FASHION_MNIST_FILES:
        images, labels = read_split(folder, split)
        arrays[split] = (images[..., None], labels)
    return Source(
        train=tf.data.Dataset.from_tensor_slices(arrays["train"]),
        test=tf.data.Dataset.from_tensor_slices(arrays["test"]),
        num_train=len(arrays["train"][1]), num_test=len(arrays["test"][1]),
        class_names=FASHION_MNIST_CLASSES, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
        train_labels=arrays["train"][1].tolist(),
    )


# ---------------------------------------------------------------- synthetic


def synthetic_arrays(num_examples: int, num_classes: int, size: int, channels: int, seed: int):
    """Deterministic, learnable images: each class is a fixed random pattern, each example that
    pattern plus independent noise. Pattern and noise carry equal weight, so a small model must learn
    but reaches high accuracy in a few steps."""
    patterns = np.random.default_rng(12345).uniform(0, 255, (num_classes, size, size, channels))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    noise = rng.uniform(0, 255, (num_examples, size, size, channels))
    images = (0.5 * patterns[labels] + 0.5 * noise).astype(np.uint8)
    return images, labels


def synthetic(config: DataConfig) -> Source:
    num_classes = config.num_classes or 10
    size, channels = config.image_size, config.channels
    train = synthetic_arrays(config.synthetic_train, num_classes, size, channels, seed=1)
    test = synthetic_arrays(config.synthetic_test, num_classes, size, channels, seed=2)
    return Source(
        train=tf.data.Dataset.from_tensor_slices(train), test=tf.data.Dataset.from_tensor_slices(test),
        num_train=config.synthetic_train, num_test=config.synthetic_test,
        class_names=[f"class_{i}" for i in range(num_classes)],
        mean=[127.5] * channels, std=[36.0] * channels, train_labels=train[1].tolist(),
    )


# ---------------------------------------------------------------- folder


def list_folder_split(root: Path, split: str, class_names: list[str] | None = None):
    """Files of `root/split/<class>/*`, labels by sorted class name, shuffled once with a fixed seed
    so the order mixes classes (a validation carve-out then holds every class)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"folder dataset {root} has no {split}/ folder; expected {root}/{split}/<class>/<image> "
                        f"(set data.train_split / data.test_split to the folder names you have)")
    class_dirs = sorted((p for p in split_dir.iterdir() if p.is_dir()), key=class_name)
    if class_names is None:
        class_names = [class_name(p) for p in class_dirs]
        if not class_names:
            raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    index = {name: i for i, name in enumerate(class_names)}
    files, labels = [], []
    for class_dir in class_dirs:
        if class_name(class_dir) not in index:
            raise UserError(f"{class_dir} is a class that the train split does not have; "
                            f"remove it or add it to train/")
        for path in sorted(class_dir.iterdir()):
            if is_image_file(path) and path.is_file():
                files.append(str(path))  # may hold surrogate escapes: read through file_names()
                labels.append(index[class_name(class_dir)])
    if not files:
        raise UserError(f"{split_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files, labels = mix_classes(files, labels)
    return files, labels, class_names


def layouts(config: DataConfig) -> str:
    """The two layouts a folder dataset may have, for the error that finds neither."""
    return (f"PATH/<class>/<image> (split by data.test_fraction and data.val_fraction) or "
            f"PATH/{config.train_split}/<class>/<image> with PATH/{config.test_split}/<class>/<image>")


def folder(config: DataConfig, recorded: folder_split.RecordedSplit | None = None) -> Source:
    """Class folders in split folders (`train/<class>`, `test/<class>`) as they are; class folders without
    a test split folder (`PATH/<class>`, or `train/<class>` alone) split by class (`shared.data.split`),
    or as a run recorded that split (`recorded`)."""
    root = Path(config.path)
    if not root.is_dir():
        raise UserError(f"folder dataset not found: {root}; set data.path to a folder laid out as {layouts(config)}")
    if recorded is not None:
        return _recorded_folder(root, recorded)
    train_dir, test_dir = root / config.train_split, root / config.test_split
    has_split_folders = train_dir.is_dir() and any(p.is_dir() for p in train_dir.iterdir())
    if not has_split_folders:  # PATH/<class>/*: a class may be named like a split, holding images itself
        return _split_folder(config, root, root)
    if not test_dir.is_dir():
        return _split_folder(config, root, train_dir)
    if config.test_fraction:
        raise UserError(f"data.test_fraction is {config.test_fraction:g} but {root} has its own test split "
                        f"({test_dir}); set data.test_fraction to 0 to test on it")
    train_files, train_labels, class_names = list_folder_split(root, config.train_split)
    test_files, test_labels, _ = list_folder_split(root, config.test_split, class_names)
    refuse_unread_formats(train_files + test_files, config)
    if config.val_fraction:  # validation by each file's own hash within its class, as for a split-less folder
        by_class: dict[int, list[str]] = {}
        for path, label in zip(train_files, train_labels):
            by_class.setdefault(label, []).append(path)
        parts = folder_split.stratified(by_class, config.val_fraction, 0.0)
        files = {part: [path for label in sorted(by_class) for path in parts[part][label]] for part in ("train", "val")}
        labels = {part: [label for label in sorted(by_class) for _ in parts[part][label]] for part in ("train", "val")}
        by_test = sorted(zip(test_labels, test_files))
        files["test"], labels["test"] = [path for _, path in by_test], [label for label, _ in by_test]
        return _listed_folder(files, labels, class_names, record={})

    return Source(
        train=_paths_dataset(train_files, train_labels), test=_paths_dataset(test_files, test_labels),
        num_train=len(train_files), num_test=len(test_files), class_names=class_names,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, encoding="path", fixed_size=False,
        files={"train": train_files, "test": test_files}, train_labels=train_labels,
    )


def list_class_folders(class_root: Path) -> dict[str, list[str]]:
    """{class: image paths} of `class_root/<class>/*`, classes sorted by name. Hidden folders are not
    classes; a class folder without images is left out with a one-line warning (a class the model never
    sees cannot be learned or tested)."""
    by_class = {}
    for class_dir in sorted((p for p in class_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                            key=class_name):
        files = [str(path) for path in class_dir.iterdir() if is_image_file(path) and path.is_file()]
        if not files:
            print(f"warning: class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                  f"it is left out of the classes", file=sys.stderr, flush=True)
            continue
        for path in files:
            folder_split.check_recordable(path)
        by_class[class_name(class_dir)] = files
    return by_class


def refuse_unread_formats(files: list[str], config: DataConfig) -> None:
    """Images whose extension names a format that is not read (HEIC, TIFF, ...) stop a run before it starts,
    in one line naming them, unless data.on_corrupt: skip leaves them out (each named as it is skipped)."""
    refused = refused_by_name(files)
    if refused and config.on_corrupt != "skip":
        shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise UserError(f"{len(refused)} image(s) in formats that are not read: {shown}; convert them to JPEG or "
                        f"PNG, or set data.on_corrupt: skip to leave them out")


def _split_folder(config: DataConfig, root: Path, class_root: Path) -> Source:
    """Class folders without a test split folder, split by class as data.test_fraction and data.val_fraction
    ask (`shared.data.split.stratified`); the run records the split."""
    by_class = list_class_folders(class_root)
    if not by_class:
        raise UserError(f"folder dataset {root} holds no images in class folders; lay it out as {layouts(config)}")
    if not config.test_fraction:
        raise UserError(f"folder dataset {class_root} has class folders but no {config.test_split}/ folder to test on; "
                        f"set data.test_fraction (e.g. 0.2) to hold out that share of each class for testing")
    refuse_unread_formats([path for files in by_class.values() for path in files], config)
    parts = folder_split.stratified(by_class, config.val_fraction, config.test_fraction)
    class_names = list(by_class)
    files = {name: [path for label in class_names for path in parts[name][label]] for name in folder_split.SPLITS}
    labels = {name: [index for index, label in enumerate(class_names) for _ in parts[name][label]]
              for name in folder_split.SPLITS}
    return _listed_folder(files, labels, class_names, record=folder_split.record(files, root))


def _recorded_folder(root: Path, recorded: folder_split.RecordedSplit) -> Source:
    """The images of the split a run recorded, whatever the folder holds now; their classes are their
    folders' names, indexed as the run's labels.txt orders them."""
    index = {name: i for i, name in enumerate(recorded.class_names)}
    files, labels = {}, {}
    for name in folder_split.SPLITS:
        relative = recorded.files.get(name, [])
        unknown = [path for path in relative if Path(path).parent.name not in index]
        if unknown:
            raise UserError(f"the run's split/{name}.txt names {unknown[0]!r}, whose folder is not one of the "
                            f"run's classes (labels.txt); the split record was edited: restore it")
        files[name] = [str(root / path) for path in relative]
        labels[name] = [index[Path(path).parent.name] for path in relative]
    missing = [path for name in folder_split.SPLITS for path in files[name] if not os.path.isfile(path)]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the split this run recorded are gone from {root} "
                        f"(first: {missing[0]}); put them back to test or resume the run on its own data")
    # recorded again: a run continued from this one (a new folder) keeps the same split
    return _listed_folder(files, labels, recorded.class_names, record=folder_split.record(files, root))


def _listed_folder(files: dict[str, list[str]], labels: dict[str, list[int]], class_names: list[str],
                   record: dict) -> Source:
    """A folder source of split file lists in class order: each split is mixed once with a fixed seed."""
    mixed = {name: mix_classes(files[name], labels[name]) for name in folder_split.SPLITS}
    datasets = {name: _paths_dataset(*mixed[name]) for name in folder_split.SPLITS}
    return Source(
        train=datasets["train"], test=datasets["test"], num_train=len(files["train"]), num_test=len(files["test"]),
        class_names=class_names, mean=IMAGENET_MEAN, std=IMAGENET_STD, encoding="path", fixed_size=False,
        files={name: mixed[name][0] for name in folder_split.SPLITS},
        val=datasets["val"] if files["val"] else None, num_val=len(files["val"]),
        train_labels=mixed["train"][1], record=record,
    )


# ---------------------------------------------------------------- ilsvrc


def _paths_dataset(files: list[str], labels: list[int]) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((tf.constant(file_names(files)), tf.constant(labels, tf.int32)))


def ilsvrc_source(config: DataConfig) -> Source:
    """The extracted ILSVRC layout: train/<wnid>/*.JPEG, val/ in class folders or flat with the official
    ground truth. Labels are Keras Applications' 1000-class indices, whichever classes are present."""
    from shared.data import ilsvrc

    root = Path(config.path)
    if not root.is_dir():
        raise UserError(f"ILSVRC folder not found: {root}; set data.path to the folder holding train/ and val/")
    train_files, train_labels = ilsvrc.list_ilsvrc_split(root, config.train_split)
    test_files, test_labels = ilsvrc.list_ilsvrc_split(root, config.test_split)
    return Source(train=_paths_dataset(train_files, train_labels), test=_paths_dataset(test_files, test_labels),
                  num_train=len(train_files), num_test=len(test_files), class_names=ilsvrc.imagenet_wnids(),
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, encoding="path", fixed_size=False,
                  files={"train": train_files, "test": test_files}, train_labels=list(train_labels))


# ---------------------------------------------------------------- tfrecord


def _oversampled(root: Path, files: list[str], count: int, oversample) -> tuple[list[str], int]:
    """The train shards with those `oversample` names ({glob under root: N}) listed N times, and the records a
    pass then reads. A glob that names none of them is said in one line, not refused: a loop round's run names
    its newest shard sets, which the loop may merge later, and its test (which builds the train split too)
    must still run."""
    from shared.data import tfrecord  # as tfrecord_source: TensorFlow's shard reader, loaded with it

    extra, added = [], 0
    for pattern, times in oversample.items():
        matched = [name for name in files if fnmatch.fnmatchcase(name, str(root / pattern))]
        if not matched:
            print(f"data.oversample {pattern!r} matches none of the train shards under {root} (a glob relative to "
                  f"data.path): they are read once each", flush=True)
        elif times > 1:  # each matched shard counted once, not once per extra read
            extra += matched * (times - 1)
            added += tfrecord.count_records(matched) * (times - 1)
    return files + extra, count + added


TFRECORD_PREFIXES = {"val": "validation"}  # Model Garden names the ImageNet val shards validation-*


def tfrecord_source(config: DataConfig) -> Source:
    """Shards in TF Model Garden's layout (image/encoded, image/class/label) under data.path:
    <split>-NNNNN-of-NNNNN, labels.txt, and counts.json as scripts/make_tfrecords.py writes them."""
    import json

    from shared.data import tfrecord

    root = Path(config.path)
    if not root.is_dir():
        raise UserError(f"TFRecord folder not found: {root}; write one with scripts/make_tfrecords.py")
    class_names = tfrecord.read_labels(root / "labels.txt")
    counts_file = root / "counts.json"
    counts = json.loads(counts_file.read_text(encoding="utf-8")) if counts_file.is_file() else {}
    splits = {}
    skipping = config.on_corrupt == "skip"  # labels checked after the undecodable images are dropped
    for role, split in (("train", config.train_split), ("test", config.test_split)):
        prefix = TFRECORD_PREFIXES.get(split, split)
        files = tfrecord.resolve_files(str(root / f"{prefix}-*-of-*"))
        count = counts.get(prefix) or tfrecord.count_records(files)  # without counts.json: read once
        if role == "train" and config.oversample:
            files, count = _oversampled(root, files, count, config.oversample)
        # A fixed file order when a validation split is carved off train; else shuffle shards each epoch.
        shuffle = role == "train" and config.val_fraction == 0
        dataset = tfrecord.read_dataset(files, label_offset=config.label_offset, shuffle_files=shuffle, seed=0,
                                        num_classes=len(class_names), check_labels=not skipping)
        splits[role] = (dataset, count, files)
    checked = tfrecord.label_check(config.label_offset, len(class_names)) if skipping else None
    return Source(train=splits["train"][0], test=splits["test"][0], num_train=splits["train"][1],
                  num_test=splits["test"][1], class_names=class_names, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  encoding="bytes", fixed_size=False, label_check=checked)


# ---------------------------------------------------------------- tfds

TFDS_STORAGE_URL = "https://storage.googleapis.com"  # TFDS's own mirror, for builders that name no URL
PROBE_SECONDS = 3.0  # a download host that has not answered by then counts as unreachable


def unreachable(url: str) -> str | None:
    """Why `url`'s host (or the proxy configured for it) cannot be reached within PROBE_SECONDS, else None.
    TFDS retries a failed download for minutes (urllib3 backoff); offline, this says so in seconds."""
    target = urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    outcome: dict = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            outcome["error"] = None
        except OSError as error:
            outcome["error"] = error

    probe = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
    probe.start()
    probe.join(PROBE_SECONDS)
    if "error" not in outcome:
        return f"no network: {host}:{port} did not answer within {PROBE_SECONDS:g} s"
    error = outcome["error"]
    return None if error is None else f"no network: cannot reach {host}:{port} ({type(error).__name__}: {error})"


def tfds_source(config: DataConfig, name: str | None = None, builder=None,
                mean: list[float] | None = None, std: list[float] | None = None) -> Source:
    """Any TFDS dataset with an image and a label feature (`as_supervised`), prepared by TFDS itself;
    data_dir and manual_dir (ImageNet's tars) pass through."""
    import tensorflow_datasets as tfds

    name = name or config.name
    if builder is None:
        try:
            builder = tfds.builder(name, data_dir=config.data_dir)
        except Exception as error:  # DatasetNotFoundError and friends
            raise UserError(f"TFDS has no dataset {name!r} ({str(error).splitlines()[0][:200]}); "
                            f"check data.name against `tfds.list_builders()`") from None
        # Datasets built from manual_dir's files (ImageNet) need no network; the others are downloaded.
        offline = None if builder.is_prepared() or builder.MANUAL_DOWNLOAD_INSTRUCTIONS else \
            unreachable(getattr(builder, "URL", None) or TFDS_STORAGE_URL)
        if offline:
            raise UserError(f"TFDS cannot download {name!r} ({offline}); prepare it on a machine with network "
                            f"and set data.data_dir to that copy (now {config.data_dir or 'the TFDS default'})")
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir))
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            manual = (f" For {name}, put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in data.manual_dir "
                      f"(now {config.manual_dir or 'unset'}); "
                      "data.data_dir chooses where TFDS writes the prepared copy."
                      if name.startswith("imagenet") else "")
            raise UserError(f"TFDS could not prepare {name!r}: {first_line}.{manual}") from None
    info = builder.info
    label_feature = info.features["label"] if "label" in info.features else None
    if label_feature is None or not hasattr(label_feature, "num_classes"):
        raise UserError(f"TFDS dataset {name!r} has no class label feature; it cannot train a classifier")

    def split(split_name: str):
        try:
            # Variable-size images (ImageNet) stay encoded, so decoding fuses with the crop in the map.
            decoders = None if fixed else {"image": tfds.decode.SkipDecoding()}
            dataset = builder.as_dataset(split=split_name, as_supervised=True, shuffle_files=False,
                                         decoders=decoders)
            count = int(dataset.cardinality())
            if count < 0:  # unknown to tf.data: ask the dataset's metadata
                count = info.splits[split_name].num_examples
        except (KeyError, ValueError) as error:
            raise UserError(f"TFDS dataset {name!r} has no split {split_name!r} ({error}); "
                            f"available: {', '.join(info.splits.keys())}") from None
        if deferred:  # make_datasets checks them after dropping undecodable images (label_check below)
            return dataset.map(lambda image, label: (image, tf.cast(label, tf.int32))), count
        return dataset.map(lambda image, label: (image, checked_label(label, split_name))), count

    def checked_label(label, split_name: str | None = None):
        # TFDS' ClassLabel encodes only valid indices; a hand-made or altered dataset may not hold to it
        where = f" split {split_name!r}" if split_name else ""
        check = checks.check((label >= 0) & (label < label_feature.num_classes), f"TFDS dataset {name!r}{where} ",
                             "holds label ", label, f", outside 0-{label_feature.num_classes - 1} "
                             f"for its {label_feature.num_classes} classes; prepare it again (delete its folder "
                             f"in data.data_dir)")
        with tf.control_dependencies([check]):
            return tf.cast(label, tf.int32)

    shape = info.features["image"].shape
    fixed = shape[0] is not None and shape[0] == shape[1]
    channels = shape[-1] or 3
    deferred = config.on_corrupt == "skip" and not fixed  # encoded images: undecodable ones are skipped
    train, num_train = split(config.train_split)
    test, num_test = split(config.test_split)
    return Source(train=train, test=test, num_train=num_train, num_test=num_test,
                  class_names=list(label_feature.names), fixed_size=fixed, encoding=None if fixed else "bytes",
                  mean=mean or (IMAGENET_MEAN if channels == 3 else [127.5]),
                  std=std or (IMAGENET_STD if channels == 3 else [64.0]),
                  label_check=checked_label if deferred else None)
