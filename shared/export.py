"""Publishing a SavedModel for TensorFlow Serving: the export folder, whatever the model serves.

The layout is the one TF Serving watches: `<export_dir>/<model_name>/<version>/` with integer versions;
it serves the highest and hot-swaps when a higher one appears, so exporting after each training round
(train-in-the-loop) updates a running server with no restart. Every version holds two endpoints
(`write_archive`): `serving_default` on encoded image bytes and `predict_images` on float pixels; what they
return is the task's (each task's `export.py`). A version appears by a rename of a finished folder
(`publish`), so a watching server never sees half a model; older versions are pruned to the newest `keep`,
and `<export_dir>/models.config` lists every model for a multi-model server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Hashable

from shared.errors import UserError
from shared.durable import DiskFull, atomic_write, disk_space_checked, fsync_dir, fsync_tree
from shared.locks import FileLock, holder, read_record
from shared.names import check_plain_name
from shared.runs import Run

CONFIG_FILE = "models.config"
LOCK_FILE = ".export.lock"  # in the export folder: exports there publish, prune and list one at a time
STAGING_PREFIX = ".export-"  # a version being written, hidden from TF Serving until it is renamed
STAGING_LOCK = ".writing.lock"  # held inside a staging folder by the export writing it
SETUP_PREFIX = ".new-export-"  # a staging folder until its lock is held: the clean-up leaves it alone
DELETING_PREFIX = ".deleting-"  # a pruned version on its way out
SERVING_PATH = "/models"  # where the tensorflow/serving image looks for models
SERVING_DEFAULT = "serving_default"
PREDICT_IMAGES = "predict_images"
VERSION_RE = re.compile(r"^\d+$")  # TF Serving's version folders: all digits
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------- the export folder


def versions(model_dir: Path) -> dict[int, Path]:
    """The numeric version folders of one model folder (none if it does not exist)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    return {int(p.name): p for p in model_dir.iterdir() if VERSION_RE.match(p.name)}


def _is_saved_model(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file())


def _check_model_dir(model_dir: Path) -> None:
    """Refuse a folder that holds something besides SavedModel versions and hidden entries: exporting
    (and pruning) there would mix our versions with someone else's files, or a mistyped --export-dir
    (a runs root, say) would be written into."""
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"{model_dir} is a file, not a model folder; choose another --export-dir or --name")
    for entry in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
        if entry.name.startswith("."):
            continue  # our temporary folders, editor files: TF Serving ignores them too
        if not VERSION_RE.match(entry.name) or not _is_saved_model(entry):
            raise UserError(f"{entry} is not a SavedModel version (an all-digit folder with saved_model.pb); "
                            f"{model_dir} must hold only exported versions: move it away or export elsewhere")


def export_lock(export_dir: str | Path) -> FileLock:
    """Held while an export reads the versions, publishes one, prunes and writes models.config, so two
    exports into one folder never take one number, prune each other's folders or list a half state."""
    return FileLock(Path(export_dir).expanduser() / LOCK_FILE)


def _remove(path: Path) -> None:
    """Delete a version folder: first rename it to a hidden name (one atomic step, after which TF Serving
    no longer sees it), then remove the files."""
    hidden = path.parent / f"{DELETING_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(path, hidden)
    except FileNotFoundError:  # removed already, by an export that did not take the lock
        return
    shutil.rmtree(hidden, ignore_errors=True)


def remove_abandoned(model_dir: Path) -> list[Path]:
    """Remove what killed exports left in a model folder: staging folders whose writer's lock is free (the
    kernel frees it when the writer dies) and versions half deleted by a prune. Run under `export_lock`.
    A staging folder only ever carries its `.export-` name with its lock held (`_locked_staging`), so a free
    lock there is a dead writer's. A folder still being set up is removed only once its lock file holds a
    writer's record (written after the lock was taken) and the lock is free again: that writer died."""
    removed = []
    for entry in sorted(Path(model_dir).iterdir()) if Path(model_dir).is_dir() else []:
        lock = entry / STAGING_LOCK
        abandoned = entry.name.startswith(STAGING_PREFIX) and lock.is_file() and holder(lock) is None
        died_setting_up = entry.name.startswith(SETUP_PREFIX) and bool(read_record(lock)) and holder(lock) is None
        if entry.is_dir() and (abandoned or died_setting_up or entry.name.startswith(DELETING_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def prune(model_dir: Path, keep: int) -> list[int]:
    """Keep only the newest `keep` numeric versions; returns the versions removed."""
    if keep < 1:
        raise UserError(f"--keep must be at least 1 (got {keep}): TF Serving needs a version to serve")
    found = versions(model_dir)
    removed = sorted(found)[:-keep]
    for number in removed:
        _remove(found[number])
    return removed


def model_folders(export_dir: Path) -> list[str]:
    """The model folders of an export folder: visible folders with at least one SavedModel version."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        return []
    return sorted(p.name for p in export_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(map(_is_saved_model, versions(p).values())))


def write_models_config(export_dir: Path) -> Path:
    """`<export_dir>/models.config`, TF Serving's model config (text proto) listing every model folder,
    for `--model_config_file` when the whole export folder is mounted at /models."""
    export_dir = Path(export_dir)
    entries = "".join(
        "  config {\n"
        f"    name: {json.dumps(name)}\n"
        f"    base_path: {json.dumps(f'{SERVING_PATH}/{name}')}\n"
        '    model_platform: "tensorflow"\n'
        "  }\n"
        for name in model_folders(export_dir))
    text = ("# Written by shared.export. Serve every model here with:\n"
            f"#   docker run -p 8501:8501 -v {shlex.quote(str(export_dir.resolve()))}:{SERVING_PATH} "
            f"tensorflow/serving --model_config_file={SERVING_PATH}/{CONFIG_FILE}\n"
            f"model_config_list {{\n{entries}}}\n")
    path = export_dir / CONFIG_FILE
    atomic_write(path, text)
    return path


def serving_command(export_dir: str | Path, model_name: str) -> str:
    """Two lines: the `docker run` that serves the model with TF Serving's REST API on port 8501, and a
    `curl` that sends one image through it (the bytes travel base64-encoded as {"b64": ...})."""
    source = shlex.quote(f"{Path(export_dir).expanduser().resolve() / model_name}:{SERVING_PATH}/{model_name}")
    docker = (f"docker run -p 8501:8501 -v {source} -e MODEL_NAME={shlex.quote(model_name)} "
              f"tensorflow/serving")
    body = ('{"signature_name": "serving_default", "instances": [{"image_bytes": {"b64": "\'"$(base64 -w0 '
            'image.jpg)"\'"}}]}')
    curl = f"curl -d '{body}' http://localhost:8501/v1/models/{model_name}:predict"
    return f"{docker}\n{curl}"


# ---------------------------------------------------------------- export


_LAST_ARCHIVE: list = []  # [(model, same_as, its archive)]: the last one `write_archive` was asked to keep


def write_archive(model, bytes_fn, images_fn, image_shape: tuple[int, int, int], target: Path,
                  same_as: Hashable | None = None) -> None:
    """A SavedModel of `model` with the two endpoints every export has: `serving_default` on encoded image
    bytes (first and by that name, so TF Serving's default signature takes bytes) and `predict_images` on
    float pixels of `image_shape`. `same_as`: what the endpoints compute besides the model's weights (its
    preprocessing and outputs), as a key; given, the archive is kept (one, holding its model), and the next
    call for this very model object with an equal key writes it again instead of tracing new endpoints: they
    read the model's variables, so it saves their values of the moment (a kept trainer's model, exported
    round after round by the loop)."""
    import keras
    import tensorflow as tf

    kept = _LAST_ARCHIVE[0] if _LAST_ARCHIVE else None
    if same_as is not None and kept is not None and kept[0] is model and kept[1] == same_as:
        archive = kept[2]
    else:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(SERVING_DEFAULT, bytes_fn,
                             input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        archive.add_endpoint(PREDICT_IMAGES, images_fn,
                             input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name="images")])
        if same_as is not None:
            _LAST_ARCHIVE[:] = [(model, same_as, archive)]
    archive.write_out(str(target), verbose=False)


def target_folder(run: Run, export_dir: str | Path, model_name: str, version: int | None, keep: int) -> Path:
    """Check an export request before any work: the name, --keep, --version, a checkpoint to export
    and a model folder without foreign files. Returns <export_dir>/<model_name>."""
    check_plain_name("export --name", model_name)
    if not MODEL_NAME_RE.match(model_name):
        raise UserError(f"model name {model_name!r} is not usable as a folder and URL name; "
                        f"use letters, digits, '.', '_' and '-'")
    if keep < 1:
        raise UserError(f"--keep must be at least 1 (got {keep}): TF Serving needs a version to serve")
    if version is not None and version < 0:
        raise UserError(f"--version must be a non-negative integer (got {version})")
    run.checkpoint("last")  # a run without one says why (and what to do) before any work
    model_dir = Path(export_dir).expanduser() / model_name
    with export_lock(export_dir):  # another export may be publishing or pruning there
        _check_model_dir(model_dir)
        _check_version(model_dir, version, keep)
    return model_dir


def _check_version(model_dir: Path, version: int | None, keep: int) -> None:
    """An explicit --version must be new, and not so old that pruning would remove it at once."""
    if version is None:
        return
    existing = versions(model_dir)
    if version in existing:
        raise UserError(f"version {version} of {model_dir.name} exists already at {existing[version]}; "
                        f"leave out --version to export the next one ({max(existing) + 1})")
    if sum(number > version for number in existing) >= keep:
        raise UserError(f"version {version} would be pruned at once: {keep} newer version(s) of "
                        f"{model_dir.name} exist in {model_dir}; leave out --version or raise --keep")


def publish(run: Run, export_dir: str | Path, model_dir: Path, version: int | None, keep: int, write) -> Path:
    """Write a version atomically: `write(staging)` saves the SavedModel into a hidden folder (TF Serving
    ignores it) and returns provenance for assets.extra/export.json; the folder is then renamed to its
    version number, older versions pruned and models.config rewritten. A failure leaves nothing (a full
    disk: a DiskFull naming the model folder), and what a killed export left is removed by the next one
    (`remove_abandoned`); the writing runs beside other exports, the numbering, pruning and models.config
    one export at a time (`export_lock`)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging, writing = _locked_staging(model_dir)
    try:
        with disk_space_checked(model_dir):
            os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; a server may run as another user
            provenance = write(staging)
            extra = staging / "assets.extra"  # provenance beside the model; TF Serving does not read it
            extra.mkdir(exist_ok=True)
            (extra / "export.json").write_text(json.dumps({
                "run": str(run.path.resolve()), "checkpoint": run.last_checkpoint().name, **provenance,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }, indent=2) + "\n", encoding="utf-8")
            fsync_tree(staging)  # complete on disk before its version number appears
    except BaseException:
        writing.release()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with export_lock(export_dir):
        remove_abandoned(model_dir)
        writing.release()  # no cleaner runs while we hold export_lock, and the file must not be published
        (staging / STAGING_LOCK).unlink()
        try:
            _check_version(model_dir, version, keep)  # newer versions may have appeared meanwhile
            target = _publish(staging, model_dir, version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        prune(model_dir, keep)
        try:
            write_models_config(Path(export_dir).expanduser())
        except DiskFull as error:  # the version is served all the same: say so
            raise DiskFull(f"exported {target}, but {error}") from None
    return target


def _locked_staging(model_dir: Path) -> tuple[Path, FileLock]:
    """A new, empty staging folder in `model_dir` and its writer's lock, held. The folder is made under a name
    the clean-up of other exports leaves alone (SETUP_PREFIX), locked, and only then renamed to its
    `.export-` name: between making a lock file and locking it, that clean-up would take it for a dead
    writer's and delete the folder under us."""
    setting_up = Path(tempfile.mkdtemp(prefix=SETUP_PREFIX, dir=model_dir))
    writing = FileLock(setting_up / STAGING_LOCK)
    try:
        writing.acquire()
        staging = model_dir / (STAGING_PREFIX + setting_up.name[len(SETUP_PREFIX):])
        os.rename(setting_up, staging)  # the lock travels with the open file, not the name
    except BaseException:
        if writing.held_here:
            writing.release()
        shutil.rmtree(setting_up, ignore_errors=True)
        raise
    return staging, writing


def _publish(staging: Path, model_dir: Path, version: int | None) -> Path:
    """Rename the finished folder to its version. A rename onto a non-empty folder fails, so a concurrent
    export that took the same number first makes us take the next (an explicit version: an error)."""
    while True:
        number = version if version is not None else max(versions(model_dir), default=0) + 1
        target = model_dir / str(number)
        if target.exists():  # rename(2) would silently replace an empty folder
            if version is not None:
                raise UserError(f"version {version} of {model_dir.name} appeared at {target} during the export")
            continue
        try:
            os.rename(staging, target)
            fsync_dir(model_dir)
            return target
        except OSError:
            if version is not None or not target.exists():
                raise
