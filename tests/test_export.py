"""SavedModel export for TF Serving: the served graph equals the run's eval pipeline + model, versions
appear atomically and are pruned, and user mistakes are one-line errors."""

import errno
import functools
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import forked
from shared import export
from shared.classification import export as classification_export
from shared.durable import DiskFull
from shared.errors import UserError
from shared.runs import Run, open_run
from shared.tasks import rebuild

# Run in a fresh process without the project on the path: the SavedModel must stand on its own.
SERVE = r"""
import json, sys
import numpy as np, tensorflow as tf
folder, files, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
loaded = tf.saved_model.load(folder)
raw = [open(f, "rb").read() for f in files]
result = {"signatures": sorted(loaded.signatures.keys()), "inputs": {}}
serve, images = loaded.signatures["serving_default"], loaded.signatures["predict_images"]
for name, fn in (("serving_default", serve), ("predict_images", images)):
    result["inputs"][name] = sorted(fn.structured_input_signature[1])
def plain(outputs):
    return {k: (v.numpy().astype(str).tolist() if v.dtype == tf.string else v.numpy().tolist())
            for k, v in outputs.items()} | {"dtypes": {k: v.dtype.name for k, v in outputs.items()}}
result["bytes"] = plain(serve(image_bytes=tf.constant(raw)))
square = np.stack([np.array(tf.io.decode_png(r, channels=3)) for r in raw[:-1]]).astype(np.float32)
result["images"] = plain(images(images=tf.constant(square)))
json.dump(result, open(out, "w"))
"""


@functools.cache
def rebuilt(path: Path) -> tuple:
    """The model and config of the finished run at `path`, rebuilt once for this module's exports: an export
    only reads them. A run that cannot be rebuilt raises each time (nothing is cached)."""
    return rebuild(open_run(path))


def export_saved_model(run, export_dir: Path, **options) -> Path:
    """The run exported as the `export` command does it: its model rebuilt, then published."""
    run = run if isinstance(run, Run) else open_run(run)
    return classification_export.export_saved_model(*rebuilt(run.path), run, export_dir, **options)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def saved_model(trained_run, tmp_path_factory) -> Path:
    """One export of the trained run, shared: each export costs seconds of tracing and writing."""
    run, _ = trained_run
    export_dir = tmp_path_factory.mktemp("export")
    folder = export_saved_model(run, export_dir, top_k=3)
    assert folder == export_dir / "resnet" / "1"
    return folder


def eval_pipeline_probabilities(run: Run, images: list[np.ndarray]) -> np.ndarray:
    """The Keras model's probabilities on pixels preprocessed by the project's own eval map."""
    from shared.data import _image_fn, sources

    model, config = rebuilt(run.path)
    eval_fn = _image_fn(config, sources.load(config.data), None)
    return np.concatenate([model(eval_fn(tf.constant(image), 0)[0][None], training=False).numpy()
                           for image in images])


@pytest.mark.slow
def test_served_model_equals_the_eval_pipeline(trained_run, saved_model, tmp_path):
    run, _ = trained_run
    from shared.data.sources import synthetic_arrays

    pixels, _ = synthetic_arrays(6, 4, 16, 3, seed=7)
    odd = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)  # resized in the graph
    images = [*pixels, odd]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(image))

    folder = saved_model
    out = tmp_path / "served.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    forked.run([sys.executable, "-c", SERVE, str(folder), *map(str, files), str(out)],
               cwd=tmp_path, env=env, check=True, timeout=120)
    served = json.loads(out.read_text())

    assert {"serving_default", "predict_images"} <= set(served["signatures"])
    assert served["inputs"] == {"serving_default": ["image_bytes"], "predict_images": ["images"]}
    expected = eval_pipeline_probabilities(run, images)
    names = run.class_names()
    for key, count in (("bytes", len(images)), ("images", len(pixels))):
        result = served[key]
        assert set(result) - {"dtypes"} == set(classification_export.OUTPUT_KEYS)
        assert result["dtypes"] == {"probabilities": "float32", "classes": "int32", "labels": "string",
                                    "scores": "float32"}
        probabilities = np.array(result["probabilities"])
        assert probabilities.shape == (count, 4)
        assert np.abs(probabilities - expected[:count]).max() < 1e-5
        classes = np.array(result["classes"])
        assert classes.shape == (count, 3)
        assert (classes[:, 0] == expected[:count].argmax(axis=1)).all()
        assert result["labels"] == [[names[c] for c in row] for row in classes]
        assert np.allclose(result["scores"], np.take_along_axis(probabilities, classes, axis=1))
    assert len(set(np.array(served["bytes"]["classes"])[:, 0])) > 1  # not one constant answer

    provenance = json.loads((folder / "assets.extra" / "export.json").read_text())
    assert provenance["preprocessing"] == "resize" and provenance["labels"] == names
    command = export.serving_command(folder.parent.parent, "resnet")
    docker, curl = command.splitlines()
    assert f"-v {folder.parent}:/models/resnet -e MODEL_NAME=resnet tensorflow/serving" in docker
    assert "image_bytes" in curl and "localhost:8501/v1/models/resnet:predict" in curl


@pytest.mark.slow
def test_versions_increment_and_old_ones_are_pruned(trained_run, saved_model, tmp_path, monkeypatch):
    from shared.data import formats

    run, _ = trained_run
    export_dir = tmp_path / "export"
    for version in ("1", "2"):  # earlier exports, copied: a real one costs seconds
        shutil.copytree(saved_model, export_dir / "tiny" / version)
    traced = []  # Python builds the decoder's graph only while a function using it is traced
    monkeypatch.setattr(formats, "decode_crop", lambda *args, decode_crop=formats.decode_crop, **kwargs:
                        traced.append(1) or decode_crop(*args, **kwargs))
    assert export_saved_model(run, export_dir, model_name="tiny", keep=2).name == "3"
    assert traced == []  # the decoder this process traced for the fixture's export, not a new one
    assert sorted(p.name for p in (export_dir / "tiny").iterdir()) == ["2", "3"]  # no hidden leftovers
    config = (export_dir / export.CONFIG_FILE).read_text()
    assert 'name: "tiny"' in config and 'base_path: "/models/tiny"' in config
    assert 'model_platform: "tensorflow"' in config and config.count("config {") == 1

    with pytest.raises(UserError, match="exists already"):
        export_saved_model(run, export_dir, model_name="tiny", version=3)
    with pytest.raises(UserError, match="keep"):
        export_saved_model(run, export_dir, model_name="tiny", keep=0)


def test_a_failed_export_leaves_no_version(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    model_dir = tmp_path / "export" / "resnet"
    model_dir.mkdir(parents=True)

    def broken(model, bytes_fn, images_fn, image_shape, target, same_as=None):
        Path(target, "saved_model.pb").write_bytes(b"half")  # as if it died mid-write
        raise OSError("disk full")

    # The project's one SavedModel writer (patching tf.saved_model.save, reached through a lazily loaded
    # module, only took effect after an earlier test had exported)
    monkeypatch.setattr(export, "write_archive", broken)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(run, tmp_path / "export")
    assert list(model_dir.iterdir()) == []
    assert not (tmp_path / "export" / export.CONFIG_FILE).exists()


def test_foreign_files_and_untrained_runs_are_refused(trained_run, tmp_path):
    run, _ = trained_run
    model_dir = tmp_path / "export" / "resnet"
    model_dir.mkdir(parents=True)
    (model_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        export_saved_model(run, tmp_path / "export")
    (model_dir / "notes.txt").unlink()
    (model_dir / "7").mkdir()  # numeric, but not a SavedModel
    with pytest.raises(UserError, match="7"):
        export_saved_model(run, tmp_path / "export")

    untrained = tmp_path / "runs" / "resnet" / "v0001"
    shutil.copytree(run.path, untrained, ignore=shutil.ignore_patterns("*.keras"))
    with pytest.raises(UserError, match="train it first"):
        export_saved_model(untrained, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
@pytest.mark.parametrize("error", [enospc(), tf.errors.ResourceExhaustedError(
    None, None, "variables/variables.data-00000-of-00001; No space left on device")])
def test_a_full_disk_during_export_is_one_line_and_keeps_earlier_versions(trained_run, saved_model, tmp_path,
                                                                         monkeypatch, error):
    run, _ = trained_run
    export_dir = tmp_path / "export"
    shutil.copytree(saved_model, export_dir / "resnet" / "1")
    config = export.write_models_config(export_dir).read_text()

    def full(*args, **kwargs):
        Path(args[1], "saved_model.pb").write_bytes(b"half")  # as if the disk filled mid-write
        raise error

    monkeypatch.setattr(tf.saved_model, "save", full)
    with pytest.raises(DiskFull) as caught:
        export_saved_model(run, export_dir)
    message = str(caught.value)
    assert "\n" not in message and f"disk full while writing {export_dir / 'resnet'} (" in message
    assert "free there" in message
    assert sorted(p.name for p in (export_dir / "resnet").iterdir()) == ["1"]  # no half version, none hidden
    assert ((export_dir / "resnet" / "1" / "saved_model.pb").read_bytes()
            == (saved_model / "saved_model.pb").read_bytes())
    assert (export_dir / export.CONFIG_FILE).read_text() == config


@pytest.mark.slow
def test_a_full_disk_writing_models_config_keeps_the_old_one(trained_run, saved_model, tmp_path, monkeypatch):
    run, _ = trained_run
    export_dir = tmp_path / "export"
    shutil.copytree(saved_model, export_dir / "resnet" / "1")
    config = export.write_models_config(export_dir).read_text()
    fsync = os.fsync

    def full(descriptor):  # the config's temporary file cannot be flushed: where a full disk shows late
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(export.CONFIG_FILE):
            raise enospc()
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull) as caught:
        export_saved_model(run, export_dir, keep=1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"exported {export_dir / 'resnet' / '2'}, but disk full while writing "
                              f"{export_dir / export.CONFIG_FILE} (")
    assert sorted(p.name for p in (export_dir / "resnet").iterdir()) == ["2"]  # published, 1 pruned
    assert (export_dir / "resnet" / "2" / "assets.extra" / "export.json").is_file()
    assert (export_dir / export.CONFIG_FILE).read_text() == config
    assert sorted(p.name for p in export_dir.iterdir()) == [export.LOCK_FILE, export.CONFIG_FILE, "resnet"]


def test_a_full_disk_writing_a_tflite_file_keeps_the_earlier_one(trained_run, tmp_path, monkeypatch):
    from shared.classification import tflite

    run, _ = trained_run
    out = tmp_path / "model.tflite"
    out.write_bytes(b"the earlier export")
    fsync = os.fsync

    def full(descriptor):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(out.name):
            raise enospc()
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull) as caught:
        tflite.convert(*rebuilt(run.path), run, out_path=out)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"disk full while writing {out} (")
    assert out.read_bytes() == b"the earlier export" and sorted(tmp_path.iterdir()) == [out]


def test_pruning_a_version_another_process_removed_is_no_error(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    for version in ("1", "2", "3"):
        (model_dir / version).mkdir(parents=True)
    listed = export.versions(model_dir)
    shutil.rmtree(model_dir / "1")  # gone between our listing and our removal
    monkeypatch.setattr(export, "versions", lambda folder: listed)
    assert export.prune(model_dir, keep=1) == [1, 2]
    assert [p.name for p in model_dir.iterdir()] == ["3"]


@pytest.mark.slow
def test_an_explicit_version_overtaken_during_the_export_is_refused_not_pruned(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    model_dir = tmp_path / "export" / "resnet"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "saved_model.pb").write_bytes(b"an earlier version")
    write_archive = export.write_archive

    def write_while_another_export_publishes(*args, **kwargs):
        write_archive(*args, **kwargs)
        newer = model_dir / "3"  # another export's version, newer than the one asked for
        newer.mkdir()
        (newer / "saved_model.pb").write_bytes(b"another export")

    monkeypatch.setattr(export, "write_archive", write_while_another_export_publishes)
    with pytest.raises(UserError, match="version 2 would be pruned at once"):
        export_saved_model(run, tmp_path / "export", version=2, keep=1)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "3"]  # nothing published, nothing pruned


def run_with_a_checkpoint(folder: Path) -> Run:
    """What `publish` reads of a run (its path and last checkpoint's name), without training one."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "epoch-0001.keras").write_bytes(b"weights")
    return Run(folder)


def write_a_version(staging: Path) -> dict:
    (staging / "saved_model.pb").write_bytes(b"a model")
    return {}


def test_another_exports_clean_up_never_removes_a_staging_folder_being_set_up(tmp_path, monkeypatch):
    """Another export's clean-up runs at the worst moment of ours: our staging folder's lock file is made but
    not yet locked. It must not take the folder for a dead export's (it did: the folder was deleted under
    the writer)."""
    import fcntl

    from shared import locks

    export_dir, run = tmp_path / "exports", run_with_a_checkpoint(tmp_path / "run")
    model_dir = export_dir / "tiny"
    interleaved = []

    class CleanUpBeforeLocking:  # shared.locks' fcntl, with another export's clean-up before our lock
        def __getattr__(self, name):
            return getattr(fcntl, name)

        def flock(self, descriptor, operation):
            opened = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
            if opened.name == export.STAGING_LOCK and operation & fcntl.LOCK_EX and not interleaved:
                interleaved.append(sorted(p.name for p in model_dir.iterdir()))
                with export.export_lock(export_dir):
                    export.remove_abandoned(model_dir)
            return fcntl.flock(descriptor, operation)

    monkeypatch.setattr(locks, "fcntl", CleanUpBeforeLocking())
    published = export.publish(run, export_dir, model_dir, None, 2, write_a_version)
    assert interleaved and published == model_dir / "1"
    assert (published / "saved_model.pb").read_bytes() == b"a model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_the_clean_up_removes_a_staging_folder_whose_writer_died_setting_it_up(tmp_path):
    """A kill after the lock was taken, before the rename: its record is there and the lock free. A folder
    whose lock file has no record yet may be a live export's, between making the file and locking it."""
    model_dir = tmp_path / "tiny"
    died, starting = model_dir / f"{export.SETUP_PREFIX}dead", model_dir / f"{export.SETUP_PREFIX}live"
    for folder in (died, starting):
        folder.mkdir(parents=True)
    (died / export.STAGING_LOCK).write_text(json.dumps({"pid": 999999999, "host": "here", "command": "x"}))
    (starting / export.STAGING_LOCK).write_bytes(b"")
    assert export.remove_abandoned(model_dir) == [died]
    assert sorted(p.name for p in model_dir.iterdir()) == [starting.name]
