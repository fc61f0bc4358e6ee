"""`import-weights` for classifiers: a new run holding a torchvision ImageNet classifier's weights.

The run's config is the model's ImageNet recipe (`models/<name>/run.yaml`, so `test --run` reads ImageNet as a
trained run does and `--resume RUN --set train.epochs=N` trains on from the weights), with the model's torchvision
form and torchvision's preprocessing (`torchvision_weights.import_overrides`), then the user's `--set`. Its classes
are the 1000 ILSVRC2012 wnids in sorted order, which is torchvision's class index order (its ImageNet folders are
read in sorted order) and the order of the names the project ships (`shared.class_names`). Everything is read,
built and checked before the run folder exists; the folder is written by the run store (`runs.create_imported`).
"""

from __future__ import annotations

from pathlib import Path

from shared import modelzoo, runs
from shared.class_names import imagenet_names
from shared.classification import torchvision_weights as tvw
from shared.config import load_config
from shared.config_schema import as_new_run, with_changes
from shared.errors import UserError

# Model options that make the model compute torchvision's function: a --set may not change them. (aux_heads may
# follow the file; dropout acts in training only.)
FREE_OPTIONS = ("aux_heads", "dropout")


def import_run(task_class, source: str, path: str | Path, model_name: str, overrides: list[str],
               argv: list[str] | None = None) -> runs.Run:
    """The finished run of the torchvision state dict at `path` in `model_name`, configured as the module
    docstring says; one-line UserErrors for a file that is unreadable, not a state dict or of another variant."""
    if source != tvw.SOURCE:
        raise UserError(f"--from {source}: weights import from {tvw.SOURCE} only")
    path = Path(path).expanduser()
    form = tvw.import_overrides(model_name)  # an unknown model answers before the file is read
    state = tvw.read_state_dict(path)
    folder = modelzoo.model_dir(model_name)
    notes = [f"run.notes=torchvision weights imported from {path.name}"]
    config = load_config(folder / "run.yaml", [*notes, *form, *overrides])
    module = modelzoo.load_model_module(folder)
    hparams = modelzoo.resolve_hparams(module, config.model.hparams, config.where)
    for key, value in tvw.TORCHVISION_FORM[model_name].items():
        if key not in FREE_OPTIONS and hparams[key] != value:
            raise UserError(f"model.{key} is {hparams[key]!r}: torchvision's weights compute its function with "
                            f"{value!r} (models/{model_name}/notes.md); leave model.{key} out")
    task = task_class(with_changes(config, {"model.hparams": hparams}))
    config = as_new_run(task.resolve())
    data = config.data
    model = task_class(config).build(module, (data.image_size, data.image_size, data.channels))
    rows = tvw.load_into(model, model_name, hparams, state, str(path))
    record = {"source": tvw.SOURCE, "file": str(path.resolve()), "sha256": tvw.sha256(path),
              "model": tvw.variant(model_name, hparams), "mapping": "shared/classification/torchvision_weights.py",
              "form": tvw.TORCHVISION_FORM[model_name], "tensors": rows,
              "preprocessing": {key: getattr(data, key) for key in tvw.TORCHVISION_DATA}}
    return runs.create_imported(config, folder, model, list(imagenet_names()), record, argv)
