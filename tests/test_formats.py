"""Every format of the formats table (shared/data/formats.py) through every path that reads images: the
training pipeline (a folder source and TFRecord shards), the TFRecord writer, the loop's annotation reader,
predict and the SavedModel's serving signature. A read format gives the same pixels everywhere (the same
probabilities from the same model); a refused one is refused by each path in one line that says why."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from conftest import SENSITIVE_MODEL, tiny_tree
from shared.data import formats

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 255, (30, 40, 3), np.uint8)  # 30 rows, 40 columns: an orientation shows
MAX_PIXELS = 3000  # the runs' data.max_pixels: huge.png (64 x 64) is above it, the others (40 x 30) below


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def turned(orientation: int) -> bytes:
    """A JPEG whose EXIF orientation says how to show it, as a phone writes it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(PIXELS), "JPEG", quality=95, exif=exif)


def with_bits(bmp: bytes, bits: int) -> bytes:
    """A BMP whose header says `bits` per pixel (PIL writes neither 4- nor 16-bit BMPs)."""
    return bmp[:28] + bits.to_bytes(2, "little") + bmp[30:]


RGB = Image.fromarray(PIXELS)
SIXTEEN = RNG.integers(0, 65535, (30, 40)).astype(np.uint16)

READ = {  # file name -> its bytes: each format and mode the table reads
    "jpeg.jpg": encode(RGB, "JPEG", quality=95),
    "jpeg-gray.jpg": encode(RGB.convert("L"), "JPEG", quality=95),
    "jpeg-cmyk.jpg": encode(RGB.convert("CMYK"), "JPEG", quality=95),
    "jpeg-turned.jpg": turned(6),  # shown turned 90 degrees clockwise: 40 rows, 30 columns
    "jpeg-mirrored.jpg": turned(2),
    "UPPER.JPEG": encode(RGB, "JPEG", quality=95),
    "no extension": encode(RGB, "JPEG", quality=95),
    "png.png": encode(RGB, "PNG"),
    "png-rgba.png": encode(RGB.convert("RGBA"), "PNG"),
    "png-gray-alpha.png": encode(RGB.convert("LA"), "PNG"),
    "png-palette.png": encode(RGB.convert("P"), "PNG"),
    "png-1bit.png": encode(RGB.convert("1"), "PNG"),
    "png-16bit.png": encode(Image.fromarray(SIXTEEN), "PNG"),
    "gif.gif": encode(RGB.convert("P"), "GIF"),
    "gif-animated.gif": encode(RGB, "GIF", save_all=True, append_images=[RGB.rotate(180)]),
    "bmp-24.bmp": encode(RGB, "BMP"),
    "bmp-32.bmp": encode(RGB.convert("RGBA"), "BMP"),
    "webp.webp": encode(RGB, "WEBP", quality=95),
    "webp-lossless.webp": encode(RGB, "WEBP", lossless=True),
    "webp-alpha.webp": encode(RGB.convert("RGBA"), "WEBP", lossless=True),
}
SHOWN = {name: ((40, 30) if name == "jpeg-turned.jpg" else (30, 40)) for name in READ}  # (height, width)

BMP = READ["bmp-24.bmp"]
TRUNCATED = READ["jpeg.jpg"][:len(READ["jpeg.jpg"]) // 2]
REFUSED = {  # file name -> (its bytes, what every path says of it)
    "bmp-1bit.bmp": (encode(RGB.convert("1"), "BMP"), "is a 1-bit BMP"),
    "bmp-4bit.bmp": (with_bits(BMP, 4), "is a 4-bit BMP"),
    "bmp-16bit.bmp": (with_bits(BMP, 16), "is a 16-bit BMP"),
    "bmp-8palette.bmp": (encode(RGB.convert("P"), "BMP"), "is an 8-bit BMP, whose palette TensorFlow does not apply"),
    "bmp-8gray.bmp": (encode(RGB.convert("L"), "BMP"), "is an 8-bit BMP, whose palette TensorFlow does not apply"),
    "webp-animated.webp": (encode(RGB, "WEBP", save_all=True, append_images=[RGB.rotate(90)]), "is an animated WebP"),
    "photo.tif": (encode(RGB, "TIFF"), "is a TIFF image"),
    "photo.heic": (b"\0\0\0\x18ftypheic" + bytes(40), "is a HEIC/HEIF image"),
    "empty.png": (b"", "is empty"),
    "text.jpg": (b"not an image\n", "is not an image format that is read"),
    "garbage.png": (b"\x89PNG\r\n\x1a\n" + b"not really a PNG" * 3, "has a damaged PNG header"),
    "truncated.jpg": (TRUNCATED, "does not decode"),
    "huge.png": (encode(Image.new("L", (64, 64)), "PNG"),
                 f"has 64x64 = 4096 pixels, above data.max_pixels ({MAX_PIXELS})"),
}


def reference(data: bytes) -> np.ndarray:
    """PIL's view of a file as a viewer shows it: EXIF orientation applied, RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), np.int64)


@pytest.mark.parametrize("name", sorted(READ))
def test_each_read_format_decodes_as_viewers_show_it(name):
    data = READ[name]
    facts = formats.verify(data, MAX_PIXELS)
    assert (facts.height, facts.width) == SHOWN[name]
    pixels = formats.decode(tf.constant(data), 3, MAX_PIXELS).numpy().astype(np.int64)
    gray = formats.decode(tf.constant(data), 1, MAX_PIXELS).numpy()
    assert pixels.shape == (*SHOWN[name], 3) and gray.shape == (*SHOWN[name], 1)
    if name == "png-16bit.png":  # 16 bits scaled to 8 (PIL would clip at 255 instead)
        assert np.array_equal(pixels[..., 0], SIXTEEN >> 8)
        return
    difference = np.abs(pixels - reference(data))
    if facts.format == "jpeg" or name.startswith("webp."):
        # lossy: libjpeg / libwebp builds round differently (a wrong orientation or channel would differ by
        # about 85 on these noise pixels); CMYK is converted by each library its own way
        assert difference.mean() < (6.0 if "cmyk" in name else 3.0), name
    else:
        assert difference.max() == 0, name


def test_every_exif_orientation_matches_pil_and_crops_map_onto_the_stored_pixels():
    from shared.data import augment, preprocess

    for orientation in range(1, 9):
        data = turned(orientation)
        shown = reference(data)
        pixels = formats.decode(tf.constant(data), 3).numpy().astype(np.int64)
        assert pixels.shape == shown.shape and np.abs(pixels - shown).mean() < 3.0, orientation
        # a window of the shown image, decoded from the stored blocks (the fused decode-and-crop)
        window = (3, 5, 17, 11)
        crop = preprocess.decode_and_crop(tf.constant(data), window, 3).numpy().astype(np.int64)
        # (libjpeg upsamples colour at a crop's edge from fewer neighbours: a few levels there)
        assert crop.shape == (17, 11, 3) and np.abs(crop - pixels[3:20, 5:16]).mean() < 1.0, orientation
        # training's random crop is sampled on the shown image: the whole of it at scale 1 and its own aspect
        height, width = shown.shape[:2]
        whole = augment.RandomResizedCrop(16, (1.0, 1.0), (width / height, width / height))
        sampled = whole.from_encoded(tf.constant(data), 3).numpy()
        expected = tf.image.resize(pixels.astype(np.float32), [16, 16]).numpy()
        assert np.abs(sampled - expected).max() < 1e-3, orientation


def test_an_exif_orientation_in_little_endian_tiff_is_read_too():
    # PIL writes big-endian ("MM") EXIF; cameras often write little-endian ("II"): an APP1 segment by hand
    ifd = (1).to_bytes(2, "little") + (0x0112).to_bytes(2, "little") + (3).to_bytes(2, "little") \
        + (1).to_bytes(4, "little") + (8).to_bytes(2, "little") + bytes(2) + bytes(4)
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + ifd
    app1 = b"\xff\xe1" + (len(tiff) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    plain = READ["jpeg.jpg"]
    data = plain[:2] + app1 + plain[2:]
    assert formats.facts(data).orientation == 8
    assert np.abs(formats.decode(tf.constant(data), 3).numpy().astype(np.int64) - reference(data)).mean() < 3.0


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_refused_file_is_refused_in_one_line_saying_why(name):
    data, why = REFUSED[name]
    with pytest.raises(formats.Refused, match=re.escape(why)):
        formats.verify(data, MAX_PIXELS)
    if why != "does not decode":  # the header alone says it: the graph refuses it before decoding
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(f"image {name} {why}")):
            formats.decode(tf.constant(data), 3, MAX_PIXELS, name)


# ---------------------------------------------------------------- every path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on a folder whose test split holds one file of each read format (center-crop view at
    16 px), trained one epoch, with its SavedModel export. Its model is one convolution (SENSITIVE_MODEL): the
    pixels are what is compared, and it trains and exports in a fraction of a ResNet's time."""
    from shared.config import load_config
    from shared.classification.export import export_saved_model
    from shared.lifecycle import train
    from shared.tasks import rebuild

    base = tmp_path_factory.mktemp("formats")
    root = base / "images"
    for i in range(8):
        folder = root / "train" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(READ["png.png"] if i % 2 else encode(RGB.rotate(90), "PNG"))
    test = root / "test" / "cat"
    test.mkdir(parents=True)
    (root / "test" / "dog").mkdir()
    for name, data in READ.items():
        (test / name).write_bytes(data)
    tree = tiny_tree(base / "runs", train={"epochs": 1, "batch_size": 4})
    tree["data"] = {"source": "folder", "path": str(root), "image_size": 16, "max_pixels": MAX_PIXELS}
    (base / "tiny").mkdir()
    (base / "tiny" / "model.py").write_text(SENSITIVE_MODEL)
    tree["model"] = {"name": "tiny", "path": str(base / "tiny")}
    run = train(load_config(tree=tree), argv=["pytest"], draw=False)  # no test looks at its figures
    version = export_saved_model(*rebuild(run), run, base / "exports")
    return run, root, version, base


def pipeline_probabilities(run, config_changes: dict | None = None) -> tuple[list[str], np.ndarray]:
    """The run's model on its test split as the training pipeline reads it (`make_datasets`, the eval view),
    with the source changed by `config_changes`; the files in the pipeline's order, where it has files."""
    from shared.config_schema import with_changes
    from shared.data import make_datasets
    from shared.tasks import rebuild

    model, config = rebuild(run)
    datasets = make_datasets(with_changes(config, config_changes or {}))
    probabilities = np.concatenate([model(images, training=False).numpy() for images, _ in datasets.test])
    return datasets.source.files.get("test"), probabilities


@pytest.mark.slow
def test_every_read_format_gives_the_same_pixels_on_every_path(trained, tmp_path):
    from shared import annotations
    from shared.classification.loop import ClassLabel
    from shared.classification.predict import Predictor
    from shared.data import tfrecord
    from shared.tasks import rebuild

    run, root, version, _ = trained
    files, from_pipeline = pipeline_probabilities(run)
    assert sorted(Path(f).name for f in files) == sorted(READ)  # webp and the extensionless JPEG listed too
    by_name = {Path(f).name: row for f, row in zip(files, from_pipeline)}
    paths = [root / "test" / "cat" / name for name in sorted(READ)]
    expected = np.stack([by_name[path.name] for path in paths])

    for predictor in (Predictor.from_run(run, *rebuild(run)), Predictor.from_saved_model(version)):
        results = predictor.predict(paths)
        assert [r.error for r in results] == [None] * len(paths), predictor.source
        assert np.abs(np.stack([r.probabilities for r in results]) - expected).max() < 1e-5, predictor.source

    # the TFRecord writer keeps each file's bytes; the tfrecord source decodes them as the folder source did
    shards = tmp_path / "shards"
    tfrecord.write_shards([str(p) for p in paths], [0] * len(paths), None, shards, "validation", 1, progress=False)
    tfrecord.write_shards([str(p) for p in paths], [0] * len(paths), None, shards, "train", 1, progress=False)
    (shards / "labels.txt").write_text("dog\ncat\n")
    _, from_shards = pipeline_probabilities(run, {"data.source": "tfrecord", "data.path": str(shards),
                                                  "data.test_split": "val", "data.test_fraction": 0.0})
    assert np.abs(from_shards - expected).max() < 1e-5
    parsed = [tf.train.Example.FromString(record.numpy()) for record in tf.data.TFRecordDataset(
        str(next(shards.glob("validation-*"))))]
    for path, example in zip(paths, parsed):
        feature = example.features.feature
        assert feature["image/encoded"].bytes_list.value[0] == path.read_bytes()
        assert (feature["image/height"].int64_list.value[0], feature["image/width"].int64_list.value[0]) \
            == SHOWN[path.name]

    # the loop's annotation reader: each file accepted as it is, its size as shown (spans are drawn on it)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"image": str(p), "answer": "accept", "label": "cat"}) + "\n" for p in paths))
    batch = annotations.read_new(tasks, schema=ClassLabel(), class_names=["dog", "cat"])
    assert batch.malformed == [] and len(batch.examples) == len(paths)
    for path, example in zip(paths, batch.examples):
        assert example.image == path.read_bytes() and (example.height, example.width) == SHOWN[path.name]


@pytest.mark.slow
def test_every_refused_file_is_refused_by_every_path_in_one_line(trained, tmp_path):
    from shared import annotations
    from shared.classification.loop import ClassLabel
    from shared.classification.predict import Predictor
    from shared.config_schema import with_changes
    from shared.data import make_datasets, skipped_images, tfrecord
    from shared.errors import UserError, embedded_user_error
    from shared.tasks import rebuild

    run, root, version, base = trained
    folder = tmp_path / "refused"
    shutil.copytree(root / "train", folder / "train")
    (folder / "test" / "cat").mkdir(parents=True)
    (folder / "test" / "dog").mkdir()
    paths = []
    for name, (data, _) in sorted(REFUSED.items()):
        (folder / "test" / "cat" / name).write_bytes(data)
        paths.append(folder / "test" / "cat" / name)
    (folder / "test" / "dog" / "fine.png").write_bytes(READ["png.png"])

    # training: with data.on_corrupt: error the names say TIFF and HEIC before anything is read ...
    _, config = rebuild(run)
    config = with_changes(config, {"data.path": str(folder)})
    with pytest.raises(UserError, match=r"2 image\(s\) in formats that are not read: .*; convert them") as caught:
        make_datasets(config)
    assert "photo.heic" in str(caught.value) and "photo.tif" in str(caught.value)
    # ... and with skip each refused file is left out and named once, the readable one kept
    datasets = make_datasets(with_changes(config, {"data.on_corrupt": "skip"}))
    assert sum(len(labels) for _, labels in datasets.test) == 1
    assert sorted(Path(p).name for p in skipped_images(datasets.skips)["test"]) == sorted(REFUSED)

    # predict (a run, its SavedModel): a row per file, its error the table's reason
    for predictor in (Predictor.from_run(run, *rebuild(run)), Predictor.from_saved_model(version)):
        for path, result in zip(paths, predictor.predict(paths)):
            assert result.error is not None and REFUSED[path.name][1] in result.error, (predictor.source, path.name)
    # the serving signature itself: a failed request that names the reason, never a crash
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    for path in paths:
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            serve(image_bytes=tf.constant([path.read_bytes()]))
        why = REFUSED[path.name][1]
        embedded = embedded_user_error(caught.value)
        assert (embedded is not None and why in str(embedded)) if why != "does not decode" else embedded is None

    # the TFRecord writer: one line naming the file, or left out and listed with skip_corrupt
    for index, path in enumerate(paths):
        with pytest.raises(UserError, match=re.escape(f"image file {path} {REFUSED[path.name][1]}")):
            tfrecord.write_shards([str(path)], [0], None, tmp_path / f"shards-{index}", "train", 1, progress=False,
                                  max_pixels=MAX_PIXELS)
    shards = tfrecord.write_shards([str(p) for p in paths], [0] * len(paths), None, tmp_path / "skipping", "train", 1,
                                   progress=False, skip_corrupt=True, max_pixels=MAX_PIXELS)
    assert shards.corrupt == [str(p) for p in paths]

    # the loop's annotation reader: each line skipped, named by number, with the reason
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"image": str(p), "answer": "accept", "label": "cat"}) + "\n" for p in paths))
    batch = annotations.read_new(tasks, schema=ClassLabel(), class_names=["dog", "cat"], max_pixels=MAX_PIXELS)
    assert batch.examples == [] and len(batch.malformed) == len(paths)
    for number, (path, problem) in enumerate(zip(paths, batch.malformed), start=1):
        assert problem.startswith(f"line {number}: ") and REFUSED[path.name][1] in problem, problem


def test_a_turned_photo_is_annotated_and_detected_as_shown(tmp_path):
    """A phone photo stored 40 wide x 30 tall whose EXIF orientation shows it 30 wide x 40 tall: the loop's
    ingestion takes a box drawn on the shown image, detection decodes and scales boxes to the shown image,
    and an annotation giving the stored size is refused in one line (its tool did not turn it)."""
    from shared import annotations
    from shared.detection.loop import Spans
    from shared.detection.records import image_size_problem
    from shared.detection.serving import eval_pixels

    data = READ["jpeg-turned.jpg"]
    pixels, shape = eval_pixels(tf.constant(data), 16, 3)
    assert shape.numpy().tolist() == [40, 30]  # predicted boxes are scaled back to these pixels
    shown = tf.image.resize(formats.decode(tf.constant(data), 3).numpy().astype(np.float32), [16, 16])
    assert np.abs(pixels.numpy() - shown.numpy()).max() < 1e-4

    (tmp_path / "turned.jpg").write_bytes(data)
    span = {"x": 2, "y": 31, "width": 20, "height": 8, "label": "cat"}  # rows 31-39: only in the shown image
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"image": "turned.jpg", "answer": "accept", "spans": [span]})
                                          + "\n")
    batch = annotations.read_new(tmp_path / "tasks.jsonl", schema=Spans(), class_names=["cat"])
    assert batch.malformed == [] and batch.examples[0].boxes.tolist() == [[2, 31, 22, 39]]
    assert (batch.examples[0].width, batch.examples[0].height) == (30, 40)

    assert image_size_problem(str(tmp_path / "turned.jpg"), 30, 40) is None
    assert image_size_problem(str(tmp_path / "turned.jpg"), 40, 30) == \
        "is 30x40 pixels as shown (its EXIF orientation turns it) but its annotation states 40x30"
