"""ImageNet (ILSVRC2012) in its extracted layout, and the class mapping every source shares.

Classes follow Keras Applications' order: index i is the i-th of the 1000 wnids in sorted order
(n01440764 = 0 ... n15075141 = 999), the order of the `labels.txt` that tensorflow-datasets ships for
imagenet2012, so a model trained here reads the same indices as Keras' and TFDS's ImageNet.

Layout (`ROOT` is `data.path`):

    ROOT/train/<wnid>/*.JPEG            class folders (leftover per-class .tar files are ignored)
    ROOT/val/<wnid>/*.JPEG              either class folders, as for train,
    ROOT/val/ILSVRC2012_val_00000001.JPEG ...   or flat, as the val tar extracts, with ground truth from
        LOC_val_solution.csv                        (Kaggle: `ImageId,PredictionString`, first token the wnid) or
        ILSVRC2012_validation_ground_truth.txt      (devkit: one 1-based ILSVRC2012_ID per line, in file order).

Ground-truth files are looked for in ROOT, ROOT/val, ROOT/.., ROOT/../../.. (Kaggle's
`ILSVRC/Data/CLS-LOC` root) and their `ILSVRC2012_devkit_t12/data/` subfolders; the CSV wins when both
exist. The devkit's IDs are NOT the sorted-wnid order but that of its `meta.mat`: pass `synsets` (a text
file, line i = the wnid of ILSVRC2012_ID i) or keep `meta.mat` next to the txt (or in `data/` there), which
needs scipy to read.

Decoding: the one decoder of `shared.data.formats` (the content decides, not the name) already handles the train
set's oddities (grayscale and CMYK JPEGs, the PNG saved as n02105855_2933.JPEG), so there is no special decoder
here.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from shared.class_names import imagenet_names
from shared.data.listing import IMAGE_SUFFIXES, is_image, mix_classes
from shared.errors import UserError

NUM_CLASSES = 1000
LABELS_FILES = ("datasets/imagenet2012/labels.txt", "image_classification/imagenet2012_labels.txt")
CSV_NAME = "LOC_val_solution.csv"
TXT_NAME = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"


# ---------------------------------------------------------------- class mapping


@functools.lru_cache(maxsize=None)
def _wnids() -> tuple[str, ...]:
    spec = importlib.util.find_spec("tensorflow_datasets")  # its path, without importing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    candidates = [Path(root) / name for root in roots for name in LABELS_FILES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError("the ImageNet class list (imagenet2012 labels.txt of tensorflow-datasets) was not found; "
                        "install it with `pip install tensorflow-datasets`")
    wnids = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(wnids) != NUM_CLASSES or list(wnids) != sorted(set(wnids)):
        raise UserError(f"{path} does not hold {NUM_CLASSES} distinct sorted wnids; reinstall tensorflow-datasets")
    return wnids


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC2012 wnids in Keras Applications' (sorted) order."""
    return list(_wnids())


def wnid_to_index() -> dict[str, int]:
    """wnid -> class index in Keras Applications' order (n01440764 -> 0 ... n15075141 -> 999)."""
    return {wnid: i for i, wnid in enumerate(_wnids())}


def human_labels(path: str | Path | None = None) -> dict[str, str]:
    """wnid -> readable name: the names shipped with the package (`shared.class_names`), or those of a
    class-index JSON in Keras' format ({"0": ["n01440764", "tench"], ...}) at `path`."""
    if path is None:
        return imagenet_names()
    path = Path(path).expanduser()
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        entries = [index[str(i)] for i in range(NUM_CLASSES)]
        wnids, names = zip(*((str(wnid), str(name)) for wnid, name in entries))
    except FileNotFoundError:
        raise UserError(f"class-index file not found: {path}; give the path of Keras' "
                        f"imagenet_class_index.json") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a Keras class-index JSON ({type(error).__name__}: {error}); expected "
                        f'{{"0": ["n01440764", "tench"], ...}} with keys 0-{NUM_CLASSES - 1}') from None
    if list(wnids) != imagenet_wnids():
        first = next(i for i, (a, b) in enumerate(zip(wnids, _wnids())) if a != b)
        raise UserError(f"{path} lists classes in another order (index {first} is {wnids[first]}, Keras order "
                        f"has {_wnids()[first]}); use Keras Applications' imagenet_class_index.json")
    return dict(zip(wnids, names))


def decode_predictions(probabilities: np.ndarray, top: int = 5, class_index_path: str | Path | None = None
                       ) -> list[list[tuple[str, str, float]]]:
    """Top-`top` (wnid, label, score) per row of a (batch, 1000) array, best first, as
    keras.applications.imagenet_utils.decode_predictions returns them; labels are the shipped names, or
    those of `class_index_path`. (Keras' own function cannot read a local file: it downloads.)"""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != NUM_CLASSES:
        raise ValueError(f"decode_predictions expects a (samples, {NUM_CLASSES}) array, got {probabilities.shape}")
    wnids = _wnids()
    labels = human_labels(class_index_path)
    results = []
    for row in probabilities:
        best = row.argsort()[-top:][::-1]  # Keras' selection, then a stable sort by score
        result = [(wnids[i], labels.get(wnids[i], wnids[i]), float(row[i])) for i in best]
        result.sort(key=lambda entry: entry[2], reverse=True)
        results.append(result)
    return results


# ---------------------------------------------------------------- the extracted layout


def _class_folders(split_dir: Path, folders: list[os.DirEntry], index: dict[str, int]):
    files, labels = [], []
    for folder in sorted(folders, key=lambda entry: entry.name):
        if folder.name not in index:
            raise UserError(f"{folder.path} is not an ImageNet class folder ({folder.name!r} is none of the 1000 "
                            f"ILSVRC2012 wnids); remove it or move it out of {split_dir}")
        names = sorted(entry.name for entry in os.scandir(folder.path) if entry.is_file() and is_image(entry.name))
        files.extend(os.path.join(folder.path, name) for name in names)
        labels.extend([index[folder.name]] * len(names))
    return files, labels


def _search_dirs(root: Path) -> list[Path]:
    bases = [root, root / "val", root.parent, root.parent.parent.parent]
    return [d for base in bases for d in (base, base / DEVKIT_DATA)]


def _read_csv(path: Path) -> dict[str, str]:
    """ImageId -> wnid from Kaggle's LOC_val_solution.csv."""
    truth = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise UserError(f"{path} has no `ImageId,PredictionString` header; use Kaggle's LOC_val_solution.csv")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if not tokens:
                raise UserError(f"{path} line {line} has no wnid for {row[0]!r}; restore the original file")
            truth[row[0].strip()] = tokens[0]
    return truth


def _read_synsets(path: Path) -> list[str]:
    """wnids in ILSVRC2012_ID order: a text file (first token of line i = ID i) or the devkit's meta.mat."""
    if path.suffix.lower() != ".mat":
        wnids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        try:
            import scipy.io
        except ImportError:
            raise UserError(f"{TXT_NAME} numbers classes in the devkit's meta.mat order and reading {path} needs "
                            f"scipy: pip install -e \".[devkit]\"; or use {CSV_NAME} or val/<wnid>/ class "
                            f"folders") from None
        try:
            synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
            leaves = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
            wnids = [leaves[i] for i in range(1, NUM_CLASSES + 1)]
        except Exception as error:  # scipy's many format errors, missing fields or IDs
            raise UserError(f"{path} is not the ILSVRC2012 devkit's meta.mat ({type(error).__name__}: {error}); "
                            f"restore it from ILSVRC2012_devkit_t12.tar.gz") from None
    if sorted(wnids) != list(_wnids()):
        raise UserError(f"{path} does not list the 1000 ILSVRC2012 wnids once each; it must map ILSVRC2012_ID "
                        f"1-1000 (line i = ID i) to wnids, as the devkit's meta.mat does")
    return wnids


def _read_txt(path: Path, synsets: Path | None) -> dict[str, str]:
    """ImageId -> wnid from the devkit's ILSVRC2012_validation_ground_truth.txt (line n = image n)."""
    if synsets is None:
        synsets = next((p for p in (path.parent / "meta.mat", path.parent / "data" / "meta.mat") if p.is_file()),
                       None)
        if synsets is None:
            raise UserError(f"{path} numbers classes in the devkit's meta.mat order, and no meta.mat is beside it; "
                            f"put the devkit's data/meta.mat there, pass a synsets file, or use {CSV_NAME} "
                            f"or val/<wnid>/ class folders")
    order = _read_synsets(Path(synsets))
    truth = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").split(), start=1):
        if not line.isdigit() or not 1 <= int(line) <= NUM_CLASSES:
            raise UserError(f"{path} line {n} is {line!r}, not an ILSVRC2012_ID 1-{NUM_CLASSES}; restore the file")
        truth[f"ILSVRC2012_val_{n:08d}"] = order[int(line) - 1]
    return truth


def _ground_truth(root: Path, split_dir: Path, synsets: Path | None) -> tuple[Path, dict[str, str]]:
    dirs = _search_dirs(root)
    for name, reader in ((CSV_NAME, _read_csv), (TXT_NAME, lambda p: _read_txt(p, synsets))):
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is not None:
            return path, reader(path)
    raise UserError(f"{split_dir} holds images but no class folders, and no ground truth ({CSV_NAME} or {TXT_NAME}) "
                    f"is in {root}, {root / 'val'} or {root.parent}; put one there or sort the images into "
                    f"{split_dir}/<wnid>/ folders")


def list_ilsvrc_split(root: Path | str, split: str, synsets: Path | str | None = None
                      ) -> tuple[list[str], list[int]]:
    """Files and Keras-order labels of `root/split`, from class folders or (flat, as the val tar extracts)
    from the official ground truth; sorted, then shuffled once with a fixed seed so classes mix.
    `synsets` maps the devkit txt's ILSVRC2012_IDs to wnids (a text file, line i = ID i, or meta.mat)."""
    root = Path(root).expanduser()
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"ILSVRC folder {root} has no {split}/ folder; expected {root}/{split}/<wnid>/*.JPEG or "
                        f"the extracted val tar (set data.path, data.train_split / data.test_split)")
    entries = [entry for entry in os.scandir(split_dir) if not entry.name.startswith(".")]
    folders = [entry for entry in entries if entry.is_dir()]
    images = sorted(entry.name for entry in entries if entry.is_file() and is_image(entry.name))
    index = wnid_to_index()
    if folders and images:
        raise UserError(f"{split_dir} mixes class folders and loose images (e.g. {images[0]}); move the images "
                        f"into their {split_dir}/<wnid>/ folders or the folders out")
    if folders:
        files, labels = _class_folders(split_dir, folders, index)
    elif images:
        source, truth = _ground_truth(root, split_dir, Path(synsets).expanduser() if synsets else None)
        files, labels = [], []
        for name in images:
            wnid = truth.get(os.path.splitext(name)[0])
            if wnid is None:
                raise UserError(f"{split_dir / name} has no entry in {source}; remove the image or use the "
                                f"ground truth that belongs to it")
            if wnid not in index:
                raise UserError(f"{source} gives {name} the class {wnid!r}, none of the 1000 ILSVRC2012 wnids; "
                                f"restore the original file")
            files.append(str(split_dir / name))
            labels.append(index[wnid])
    elif any(entry.name.endswith(".tar") for entry in entries):
        raise UserError(f"{split_dir} holds only .tar archives; extract each class tar into {split_dir}/<wnid>/ "
                        f"(e.g. `mkdir n01440764 && tar -xf n01440764.tar -C n01440764`)")
    else:
        files, labels = [], []
    if not files:
        raise UserError(f"{split_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); expected "
                        f"{split_dir}/<wnid>/*.JPEG")
    return mix_classes(files, labels)
