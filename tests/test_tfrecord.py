"""TFRecord shards in Model Garden's layout: write, read back byte for byte, resume, corrupt files, CLI."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared.data.sources import list_folder_split
from shared.data.tfrecord import (FEATURES, count_records, example_from_file, read_dataset, read_labels,
                                  shard_name, write_shards)
from shared.durable import DiskFull
from shared.errors import UserError

from conftest import load_script

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("n01440764", "n01443537", "n01484850")


def make_source(root: Path, train_per_class: int = 3, val_per_class: int = 1) -> Path:
    """SRC/{train,val}/<wnid>/*.JPEG, 64x48 px; in train, image 1 is a grayscale JPEG and image 2 a PNG
    named .JPEG (as in ILSVRC2012's n02105855_2933.JPEG)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
                path = folder / f"{name}_{i}.JPEG"
                if split == "train" and i == 1:
                    image.convert("L").save(path, "JPEG")
                elif split == "train" and i == 2:
                    image.save(path, "PNG")
                else:
                    image.save(path, "JPEG")
    return root


@pytest.fixture
def source(tmp_path):
    root = make_source(tmp_path / "src")
    files, labels, class_names = list_folder_split(root, "train")
    return root, files, labels, class_names


def records(dataset) -> list[tuple[bytes, int]]:
    return [(image.numpy(), int(label)) for image, label in dataset]


def partial_files(folder: Path) -> list[str]:
    """Temporary files a writer left behind (shared.durable's names and the older `.NAME.partial`)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".partial") or p.name.endswith(".partial"))


def test_example_keeps_bytes_and_reads_format_from_content(source):
    _, files, labels, _ = source
    png = next(path for path in files if Image.open(path).format == "PNG")
    assert png.endswith(".JPEG")
    example = tf.io.parse_single_example(example_from_file(png, 2, "n01484850").SerializeToString(), FEATURES)
    assert example["image/encoded"].numpy() == Path(png).read_bytes()
    assert example["image/format"].numpy() == b"png"
    assert (int(example["image/height"]), int(example["image/width"])) == (48, 64)
    assert int(example["image/class/label"]) == 2 and example["image/class/synset"].numpy() == b"n01484850"
    plain = tf.io.parse_single_example(example_from_file(files[0], 0, None).SerializeToString(), FEATURES)
    assert plain["image/format"].numpy() == b"jpeg" and plain["image/class/synset"].numpy() == b""


def test_round_trip(source, tmp_path):
    _, files, labels, class_names = source
    out = tmp_path / "out"
    shards = write_shards(files, labels, [class_names[label] for label in labels], out, "train", 2, progress=False)
    assert [p.name for p in shards] == ["train-00000-of-00002", "train-00001-of-00002"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [p.name for p in shards]
    assert [count_records([p]) for p in shards] == [4, 5]  # contiguous chunks, in the caller's order
    assert count_records(str(out / "train-*")) == len(files) == 9
    # cycle_length=1 reads the shards one after the other: exactly the caller's order
    got = records(read_dataset(str(out / "train-*"), cycle_length=1))
    assert got == [(Path(path).read_bytes(), label) for path, label in zip(files, labels)]
    image, label = next(iter(read_dataset(shards)))
    assert image.dtype == tf.string and image.shape == () and label.dtype == tf.int32 and label.shape == ()
    for encoded, _ in got:  # every record decodes, whatever its format and channels
        assert tf.io.decode_image(encoded, channels=3, expand_animations=False).shape == (48, 64, 3)


def test_rerun_rewrites_only_missing_shards(source, tmp_path, capsys):
    _, files, labels, _ = source
    out = tmp_path / "out"
    shards = write_shards(files, labels, None, out, "train", 3, progress=False)
    for path in shards:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    shards[1].unlink()
    capsys.readouterr()
    again = write_shards(files, labels, None, out, "train", 3, progress=False)
    assert "skipped 2 of 3 shards already complete" in capsys.readouterr().out
    assert again == shards and again.reused == [shards[0], shards[2]]
    assert [path.stat().st_mtime == 1_000_000_000 for path in shards] == [True, False, True]
    assert partial_files(out) == []
    assert records(read_dataset(shards, cycle_length=1)) == [
        (Path(path).read_bytes(), label) for path, label in zip(files, labels)]


def test_rerun_refuses_another_list_or_shard_count(source, tmp_path):
    _, files, labels, _ = source
    out = tmp_path / "out"
    write_shards(files, labels, None, out, "train", 3, progress=False)
    with pytest.raises(UserError, match="another image list"):
        write_shards(files[::-1], labels[::-1], None, out, "train", 3, progress=False)
    with pytest.raises(UserError, match="another shard count"):
        write_shards(files, labels, None, out, "train", 2, progress=False)
    with pytest.raises(UserError, match="at most 9 shards"):
        write_shards(files, labels, None, tmp_path / "other", "train", 10, progress=False)


def test_corrupt_file(source, tmp_path, capsys):
    _, files, labels, _ = source
    truncated = Path(files[4])
    truncated.write_bytes(truncated.read_bytes()[:200])
    out = tmp_path / "out"
    with pytest.raises(UserError, match=str(truncated)):
        write_shards(files, labels, None, out, "train", 2, progress=False)
    assert not (out / shard_name("train", 1, 2)).exists() and partial_files(out) == []
    shards = write_shards(files, labels, None, out, "train", 2, progress=False, skip_corrupt=True)
    assert shards.corrupt == [str(truncated)]
    assert "skipped 1 unreadable image file" in capsys.readouterr().out
    assert count_records(shards) == len(files) - 1
    kept = {image for image, _ in records(read_dataset(shards))}
    assert kept == {Path(path).read_bytes() for path in files if path != str(truncated)}


def test_not_an_image(source, tmp_path):
    _, files, labels, _ = source
    Path(files[0]).write_text("not an image")
    with pytest.raises(UserError, match=f"{files[0]} is not an image format that is read; convert it"):
        example_from_file(files[0], 0, None)


def test_label_offset(source, tmp_path):
    _, files, labels, _ = source
    one_based = [label + 1 for label in labels]  # the older 1001-class convention
    shards = write_shards(files, one_based, None, tmp_path / "out", "train", 1, progress=False)
    assert [label for _, label in records(read_dataset(shards))] == one_based
    assert [label for _, label in records(read_dataset(shards, label_offset=-1))] == labels
    zero_based = write_shards(files, labels, None, tmp_path / "zero", "train", 1, progress=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label_offset"):
        records(read_dataset(zero_based, label_offset=-1))


def test_deterministic_order(source, tmp_path):
    _, files, labels, _ = source
    shards = write_shards(files, labels, None, tmp_path / "out", "train", 3, progress=False)
    first = records(read_dataset(shards, cycle_length=2))
    assert first == records(read_dataset(shards, cycle_length=2))
    assert sorted(first) == sorted((Path(path).read_bytes(), label) for path, label in zip(files, labels))
    shuffled = records(read_dataset(shards, shuffle_files=True, seed=3))
    assert shuffled == records(read_dataset(shards, shuffle_files=True, seed=3)) and sorted(shuffled) == sorted(first)


def test_no_files(tmp_path):
    with pytest.raises(UserError, match=r"no TFRecord files match .*train-\*; write them with scripts/make_tfr"):
        read_dataset(str(tmp_path / "train-*"))
    with pytest.raises(UserError, match="train-00000-of-00001"):
        count_records([tmp_path / "train-00000-of-00001"])
    with pytest.raises(UserError, match="no TFRecord files"):
        read_dataset([])
    with pytest.raises(UserError, match="labels.txt; write the shards"):
        read_labels(tmp_path / "labels.txt")


def script_in_process(capsys, *args) -> tuple[int, str, str]:
    """make_tfrecords.py's main() in this process (no second TensorFlow start): exit code, stdout, stderr."""
    capsys.readouterr()
    code = load_script("make_tfrecords").main([str(arg) for arg in args])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


@pytest.mark.slow
def test_script(tmp_path, capsys):
    src, out = make_source(tmp_path / "src"), tmp_path / "out"
    code, printed, err = script_in_process(capsys, src, out, "--train-shards", 2, "--val-shards", 5, "--no-progress")
    assert code == 0, err
    assert "validation: 3 images, fewer than 5 shards: writing 3 shards" in printed
    assert "train: 9 images" in printed and "labels.txt (3 classes" in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "counts.json", "encoding.json", "labels.txt", "train-00000-of-00002", "train-00001-of-00002",
        "validation-00000-of-00003", "validation-00001-of-00003", "validation-00002-of-00003"]
    assert (out / "labels.txt").read_text().split() == read_labels(out / "labels.txt") == list(CLASSES)
    files, labels, _ = list_folder_split(src, "val", list(CLASSES))
    assert records(read_dataset(str(out / "validation-*"), cycle_length=1)) == [
        (Path(path).read_bytes(), label) for path, label in zip(files, labels)]
    parsed = tf.io.parse_single_example(next(iter(tf.data.TFRecordDataset(str(out / "train-00000-of-00002")))),
                                        FEATURES)
    assert parsed["image/class/synset"].numpy().decode() == CLASSES[int(parsed["image/class/label"])]

    assert json.loads((out / "counts.json").read_text()) == {"train": 9, "validation": 3}
    assert json.loads((out / "encoding.json").read_text()) == {"images": "as they are (their own bytes)"}

    # The shards feed training as data.source tfrecord: fused decode-and-crop from the stored bytes.
    from shared.config import load_config
    from shared.data import make_datasets

    config = load_config(tree={"data": {"source": "tfrecord", "path": str(out), "test_split": "val",
                                        "image_size": 16, "augment": ["random_resized_crop", "horizontal_flip"]},
                               "train": {"batch_size": 9}})
    datasets = make_datasets(config)
    assert (datasets.num_train, datasets.num_test, datasets.class_names) == (9, 3, list(CLASSES))
    images, batch_labels = next(iter(datasets.train))
    assert images.shape == (9, 16, 16, 3) and sorted(batch_labels.numpy()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sorted(next(iter(datasets.test))[1].numpy()) == [0, 1, 2]

    code, _, err = script_in_process(capsys, tmp_path / "nowhere", out)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: folder dataset not found: {tmp_path / 'nowhere'}; pass a folder with train/<class>/ images"]


# ---------------------------------------------------------------- one writer, a full disk

HOLD_FOLDER = """
import sys
from shared.locks import folder_writer
with folder_writer(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_writer_of_a_folder_is_refused(source, tmp_path, capsys):
    import socket

    _, files, labels, _ = source
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A process of its own that imports no TensorFlow (a tenth of a second), so a plain interpreter.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(out)], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError) as caught:
            write_shards(files, labels, None, out, "train", 3, progress=False)
        message = str(caught.value)
        assert message.startswith(f"{out} is being written by pid {holder.pid} on {socket.gethostname()} since ")
        assert message.endswith("; wait for it or choose another folder")
        code, _, err = script_in_process(capsys, tmp_path / "src", out, "--train-shards", 2, "--val-shards", 1,
                                         "--no-progress")
        assert code == 2 and err.strip().splitlines() == [f"error: {message}"]
        assert sorted(p.name for p in out.iterdir()) == [".writer.lock"]  # nothing of the other's touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    write_shards(files, labels, None, out, "train", 3, progress=False)  # the holder is gone: the lock too


def full_disk_writer(monkeypatch, failing_shard: str, error: Exception) -> None:
    """TFRecordWriter whose first record into `failing_shard` (its temporary name) fails as a full disk."""
    real = tf.io.TFRecordWriter

    class Writer(real):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            self.failing = path.endswith(failing_shard)

        def write(self, record):
            if self.failing:
                super().write(record[:10])  # half a record reaches the file
                raise error
            super().write(record)

    monkeypatch.setattr(tf.io, "TFRecordWriter", Writer)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   tf.errors.ResourceExhaustedError(None, None, "No space left on device")])
def test_a_full_disk_while_writing_a_shard_is_one_line_and_keeps_finished_shards(source, tmp_path, monkeypatch,
                                                                                 error):
    _, files, labels, _ = source
    out = tmp_path / "out"
    full_disk_writer(monkeypatch, shard_name("train", 1, 3), error)
    with pytest.raises(DiskFull) as caught:
        write_shards(files, labels, None, out, "train", 3, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"disk full while writing {out / shard_name('train', 1, 3)} (")
    assert "free there" in message
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [shard_name("train", 0, 3)]
    assert partial_files(out) == []
    monkeypatch.undo()  # space freed: the rerun keeps shard 0 and writes the rest
    shards = write_shards(files, labels, None, out, "train", 3, progress=False)
    assert shards.reused == [out / shard_name("train", 0, 3)]
    assert records(read_dataset(shards, cycle_length=1)) == [
        (Path(path).read_bytes(), label) for path, label in zip(files, labels)]


def test_a_full_disk_writing_counts_is_one_line(tmp_path, monkeypatch, capsys):
    script = load_script("make_tfrecords")
    src, out = make_source(tmp_path / "src"), tmp_path / "out"
    fsync = os.fsync

    def full(descriptor):  # where a full disk shows on file systems that allocate late
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith("counts.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full)
    assert script.main([str(src), str(out), "--train-shards", "2", "--val-shards", "1", "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: disk full while writing {out / 'counts.json'} (")
    assert not (out / "counts.json").exists() and partial_files(out) == []


def test_half_shards_of_a_killed_writer_are_removed(source, tmp_path):
    _, files, labels, _ = source
    out = tmp_path / "out"
    out.mkdir()
    for name in (f".partial-0123456789ab-{shard_name('train', 1, 3)}", f".{shard_name('train', 2, 3)}.partial"):
        (out / name).write_bytes(b"half a shard")  # what SIGKILL mid-shard leaves (new and older names)
    write_shards(files, labels, None, out, "train", 3, progress=False)
    assert partial_files(out) == []


def test_max_side_stores_large_images_bounded_and_a_rerun_with_another_is_refused(tmp_path, capsys):
    """--max-side: images longer than N are stored as shown (EXIF orientation applied), area-resized to N on their
    long side, as JPEGs of --quality; smaller ones keep their bytes; encoding.json says so; resumable as ever."""
    src = tmp_path / "src"
    y, x = np.mgrid[0:300, 0:400]
    picture = np.stack([x * 255 // 400, y * 255 // 300, np.full_like(x, 90)], -1).astype(np.uint8)
    for split in ("train", "val"):
        folder = src / split / "n01440764"
        folder.mkdir(parents=True)
        Image.fromarray(picture).save(folder / "wide.JPEG", "JPEG", quality=95)
        exif = Image.Exif()
        exif[0x0112] = 6  # shown turned a quarter: 300 wide, 400 high
        Image.fromarray(picture).save(folder / "phone.JPEG", "JPEG", quality=95, exif=exif.tobytes())
        Image.fromarray(picture).save(folder / "drawing.png", "PNG")
        Image.fromarray(picture[:40, :50]).save(folder / "small.JPEG", "JPEG")
    out = tmp_path / "out"
    script = load_script("make_tfrecords")
    args = [str(src), str(out), "--train-shards", "2", "--val-shards", "1", "--max-side", "64", "--quality", "85",
            "--no-progress"]
    assert script.main(args) == 0
    assert json.loads((out / "encoding.json").read_text())["max_side"] == 64
    assert json.loads((out / "encoding.json").read_text())["quality"] == 85
    records = [tf.io.parse_single_example(record, FEATURES)
               for record in tf.data.TFRecordDataset(sorted(str(p) for p in out.glob("validation-*")))]
    shapes = [(int(parsed["image/height"]), int(parsed["image/width"])) for parsed in records]
    assert sorted(shapes) == [(40, 50), (48, 64), (48, 64), (64, 48)]  # the phone photo as shown: portrait
    stored = dict(zip(shapes, records))
    small = stored[(40, 50)]
    assert small["image/encoded"].numpy() == (src / "val" / "n01440764" / "small.JPEG").read_bytes()
    portrait = tf.io.decode_jpeg(stored[(64, 48)]["image/encoded"]).numpy().astype(int)
    assert stored[(64, 48)]["image/format"].numpy() == b"jpeg" and portrait.shape == (64, 48, 3)
    expected = np.asarray(Image.fromarray(picture).transpose(Image.Transpose.ROTATE_270).resize((48, 64),
                                                                                              Image.BOX)).astype(int)
    assert np.abs(portrait - expected).mean() < 4  # the picture as shown, resized, not stored sideways

    (out / "train-00001-of-00002").unlink()  # a writer killed before its last shard: the rerun finishes it
    capsys.readouterr()
    assert script.main(args) == 0
    assert "skipped 1 of 2 shards already complete" in capsys.readouterr().out
    assert script.main([*args[:6], "--max-side", "128", "--no-progress"]) == 2  # not mixed with 64 px shards
    assert "were written from another image list" in capsys.readouterr().err
    assert json.loads((out / "encoding.json").read_text())["max_side"] == 64


def test_a_file_name_that_is_not_utf8_is_written(tmp_path):
    """A class folder holding a file whose name is Latin-1 bytes (a surrogate-escaped str in Python)."""
    from shared.data.tfrecord import write_shards

    folder = tmp_path / "src" / "train" / "n01440764"
    folder.mkdir(parents=True)
    name = folder / os.fsdecode(b"caf\xe9.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(name, "JPEG")
    shards = write_shards([str(name)], [0], None, tmp_path / "out", "train", 1, progress=False)
    assert count_records(shards) == 1
