"""Pascal VOC folders (Annotations/*.xml, JPEGImages/, ImageSets/Main/): `read_voc` into the common form
(`shared.detection.records`), `write_voc` back.

Class indices: the class names sorted, unless a label list is given (`detection.label_map`: one name a line,
or a label_map.pbtxt), whose order is kept. `difficult` objects are KEPT (and trained on), flagged in
`DetectionRecord.difficult` so an evaluation can ignore them; `read_voc(..., skip_difficult=True)` drops them.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from shared.detection.records import (DetectionRecord, DetectionSplit, check_box, positive_int, read_annotation_text,
                                      require_image_files, require_image_sizes)
from shared.errors import UserError


def _voc_image_ids(root: Path, image_set: str | None) -> tuple[list[str], str]:
    """The ids of an image set (a name under ImageSets/Main/ or a path to a list), or every XML's stem."""
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise UserError(f"{root} has no Annotations/ folder; set data.path to the VOC root "
                        f"(the folder holding Annotations/, JPEGImages/, ImageSets/)")
    if image_set is None:
        ids = sorted(path.stem for path in annotations.glob("*.xml"))
        if not ids:
            raise UserError(f"{annotations} holds no .xml files; set data.path to the VOC root")
        return ids, str(annotations)
    candidates = [Path(image_set).expanduser(), root / "ImageSets" / "Main" / f"{image_set}.txt"]
    if not Path(image_set).is_absolute():
        candidates.insert(1, root / image_set)
    list_file = next((path for path in candidates if path.is_file()), None)
    if list_file is None:
        raise UserError(f"VOC image set {image_set!r} not found (looked for {', '.join(map(str, candidates))}); "
                        f"set detection.train_annotations / test_annotations to a set name such as trainval")
    text = read_annotation_text(list_file, "VOC image set", "list one image id a line")
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise UserError(f"VOC image set {list_file} lists no images; list one image id a line")
    return ids, str(list_file)


def _voc_text(element: ET.Element, tag: str, where: str, fix: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise UserError(f"{where} has no <{tag}>; {fix}")
    return child.text.strip()


def _parse_voc_xml(path: Path, images_dir: Path) -> tuple[str, int, int, list, list, list]:
    """(image file, width, height, boxes, class names, difficult flags) of one VOC annotation file. VOC
    boxes are 1-based inclusive pixel indices; they become continuous xyxy: (xmin - 1, ymin - 1, xmax, ymax)."""
    fix = "fix the XML or regenerate it"
    if not path.is_file():
        raise UserError(f"VOC annotation {path} not found; remove its id from the image set or add the XML")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read VOC annotation {path} ({error.strerror or error}); {fix}") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        # VOC files declare nothing; entity expansion ("billion laughs") is refused outright, whatever
        # protection the linked expat has
        raise UserError(f"{path} declares a DTD or entities, which a VOC annotation never does; {fix}")
    try:
        tree = ET.fromstring(data)
    except ET.ParseError as error:
        raise UserError(f"{path} is not valid XML ({error}); {fix}") from None
    size = tree.find("size")
    if size is None:
        raise UserError(f"{path} has no <size> (width, height); add <size><width>W</width><height>H</height>"
                        f"</size>")
    width = positive_int(_voc_text(size, "width", f"{path} <size>", fix), str(path), "<width>", fix)
    height = positive_int(_voc_text(size, "height", f"{path} <size>", fix), str(path), "<height>", fix)
    filename = tree.findtext("filename")
    image = images_dir / (filename.strip() if filename and filename.strip() else f"{path.stem}.jpg")
    boxes, names, difficult = [], [], []
    for number, obj in enumerate(tree.findall("object"), 1):
        where = f"{path} object {number}"
        name = _voc_text(obj, "name", where, fix)
        box = obj.find("bndbox")
        if box is None:
            raise UserError(f"{where} ({name}) has no <bndbox>; {fix}")
        try:
            x_min, y_min, x_max, y_max = (float(_voc_text(box, tag, f"{where} <bndbox>", fix))
                                          for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise UserError(f"{where} ({name}): <bndbox> holds a value that is not a number; {fix}") from None
        boxes.append(check_box([x_min - 1, y_min - 1, x_max, y_max], width, height, f"{where} ({name})",
                                "fix <bndbox> (1-based pixel indices, xmax >= xmin) or remove the object"))
        names.append(name)
        difficult.append((obj.findtext("difficult") or "0").strip() not in ("0", "", "false"))
    return str(image), width, height, boxes, names, difficult


def read_voc(root: str | os.PathLike, image_set: str | None = None, class_names: Sequence[str] | None = None,
             skip_difficult: bool = False, check_files: bool = True,
             skipped: list[str] | None = None) -> DetectionSplit:
    """A Pascal VOC folder: root/Annotations/<id>.xml and root/JPEGImages/<filename>, the images of
    `image_set` (a name under ImageSets/Main/, or a path to a list of ids; None: every XML). Class indices
    follow `class_names` (a label list) or, without one, the sorted names found. `difficult` objects are kept
    and flagged (`DetectionRecord.difficult`), or left out with `skip_difficult`. With a `skipped` list, an XML
    that does not parse or check is left out and its one-line message appended, instead of raised."""
    root = Path(root).expanduser()
    ids, listed_in = _voc_image_ids(root, image_set)
    parsed = []
    for image_id in ids:
        try:
            parsed.append((image_id, _parse_voc_xml(root / "Annotations" / f"{image_id}.xml", root / "JPEGImages")))
        except UserError as error:
            if skipped is None:
                raise
            skipped.append(str(error))  # the converter's skip mode: this XML is left out, named once
    if class_names is None:
        class_names = sorted({name for _, entry in parsed for name in entry[4]})
        if not class_names:
            raise UserError(f"the VOC images of {listed_in} hold no objects; check the image set")
    index = {name: i for i, name in enumerate(class_names)}
    records = []
    for image_id, (image, width, height, boxes, names, difficult) in parsed:
        keep = [i for i in range(len(names)) if not (skip_difficult and difficult[i])]
        for i in keep:
            if names[i] not in index:
                raise UserError(f"{root / 'Annotations' / image_id}.xml names class {names[i]!r}, which the label "
                                f"list does not have; add it to detection.label_map or fix the <name>")
        records.append(DetectionRecord(image, width, height, np.array([boxes[i] for i in keep], np.float32),
                                       np.array([index[names[i]] for i in keep], np.int32), name=image_id,
                                       difficult=np.array([difficult[i] for i in keep], bool)))
    if check_files:
        require_image_files(records, "(from its VOC annotation)",
                            f"put the images in {root / 'JPEGImages'} or fix <filename>")
        require_image_sizes(records, "its VOC annotation's <size> states",
                            "fix <size> in the annotation or replace the image")
    return DetectionSplit(records, list(class_names), listed_in)


def voc_class_names(root: str | os.PathLike, image_sets: Iterable[str | None]) -> list[str]:
    """The sorted class names of the objects in several image sets (so train and test share indices)."""
    root = Path(root).expanduser()
    names = set()
    for image_set in image_sets:
        ids, _ = _voc_image_ids(root, image_set)
        for image_id in ids:
            names.update(_parse_voc_xml(root / "Annotations" / f"{image_id}.xml", root / "JPEGImages")[4])
    return sorted(names)


def write_voc(split: DetectionSplit, root: str | os.PathLike, image_set: str) -> None:
    """Write a split in the VOC layout: root/JPEGImages/<file> (a hard link or a copy; the format is kept, so
    PNGs stay PNGs), root/Annotations/<stem>.xml (1-based inclusive pixel boxes) and
    root/ImageSets/Main/<image_set>.txt. Record file names must be unique across the sets written."""
    root = Path(root)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = []
    for record in split.records:
        if not isinstance(record.image, str):
            raise ValueError("write_voc needs records with image files, not encoded bytes")
        source = Path(record.image)
        target = root / "JPEGImages" / source.name
        if target.exists():
            target.unlink()
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        annotation = ET.Element("annotation")
        ET.SubElement(annotation, "folder").text = root.name
        ET.SubElement(annotation, "filename").text = source.name
        size = ET.SubElement(annotation, "size")
        for tag, value in (("width", record.width), ("height", record.height), ("depth", _channels_of(source))):
            ET.SubElement(size, tag).text = str(value)
        for box, class_index, difficult in zip(record.boxes.tolist(), record.classes.tolist(),
                                               record.difficult.tolist()):
            obj = ET.SubElement(annotation, "object")
            ET.SubElement(obj, "name").text = split.class_names[class_index]
            ET.SubElement(obj, "difficult").text = str(int(difficult))
            bndbox = ET.SubElement(obj, "bndbox")
            x_min, y_min, x_max, y_max = box
            for tag, value in (("xmin", x_min + 1), ("ymin", y_min + 1), ("xmax", x_max), ("ymax", y_max)):
                ET.SubElement(bndbox, tag).text = f"{value:g}" if value == int(value) else f"{value:.2f}"
        ET.indent(annotation)
        ET.ElementTree(annotation).write(root / "Annotations" / f"{source.stem}.xml", encoding="utf-8")
        ids.append(source.stem)
    (root / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def _channels_of(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return len(image.getbands())
