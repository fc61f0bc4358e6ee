"""Starting weights for fine-tuning: copy another model's weights into a freshly built one, by layer name,
and freeze layers.

The source is either a finished run (`init.from_run`, or a checkpoint inside a run folder: its model rebuilt
from its own snapshotted model.py and config.yaml by the command at the top, which hands it down as a
`shared.task.Rebuilt`; `source_run` says which run that is) or a weight file (`init.weights`: a `.keras`
checkpoint, a `.weights.h5`, or a Keras 2 `.h5` such as Keras Applications' ImageNet downloads). Weight files
load by layer order, so they go first into a twin of the new model at the file's class count (or into its
backbone, for a no-top file).

The classifier head (every layer of `build` that `backbone` does not have) may change shape, since a new
data set has another class count: its layers are copied where shapes agree and otherwise keep their fresh
initialization. Everywhere else the two models must agree, or the error says which layers differ and how.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

import h5py
import keras

from shared import modelzoo
from shared.config_schema import InitConfig
from shared.errors import UserError
from shared.modelzoo import MAIN_OUTPUT
from shared.runs import IMPORTED_FILE, Run, open_run
from shared.task import Rebuilt

BACKBONE_PATTERN = "backbone"  # train.freeze: every layer but the classifier head
MAX_LISTED = 5  # layers (or hyperparameters) named in one error message


# ---------------------------------------------------------------- the classifier head


def head_layer_names(module: ModuleType, model: keras.Model, hparams: dict, input_shape: tuple) -> set[str]:
    """The names of `model`'s classifier head: its layers that the model's `backbone` (built with the
    hyperparameters its signature accepts) does not have. Auxiliary classifiers count as head too. A model
    file without `backbone()` falls back to the layers that produce the model's outputs."""
    if not callable(getattr(module, "backbone", None)):
        return _output_layer_names(model)
    trunk = module.backbone(input_shape=tuple(input_shape), **_accepted_kwargs(module.backbone, hparams))
    trunk_names = {layer.name for layer in trunk.layers}
    return {layer.name for layer in _non_input_layers(model) if layer.name not in trunk_names}


def _accepted_kwargs(function, hparams: dict) -> dict:
    """The hyperparameters `function` takes (a backbone has no dropout or aux_heads), lists as tuples as
    `modelzoo.build_model` passes them."""
    parameters = inspect.signature(function).parameters
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in hparams.items() if name in parameters and name != "input_shape"}


def _output_layer_names(model: keras.Model) -> set[str]:
    outputs = keras.tree.flatten(model.outputs)
    return {tensor._keras_history.operation.name for tensor in outputs}


def _non_input_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


# ---------------------------------------------------------------- sources of weights


@dataclass
class Source:
    """A model holding the starting weights, with what the run's notes and error messages say about it."""
    model: keras.Model
    description: str  # e.g. "runs/resnet/v0002 (checkpoints/epoch-0003.keras, model built from ...)"
    hparams: dict | None = None  # the hyperparameters it was built with, when known (a run's)
    input_shape: tuple | None = None
    has_classifier: bool = True  # False for a no-top weight file


def source_run(init: InitConfig) -> tuple[Run, Path | None] | None:
    """The finished run whose model holds `init`'s starting weights, and the checkpoint to load (None: its
    last): `init.from_run`, or a `.keras` checkpoint inside a run folder (that run's, rebuilt from its own
    snapshot: its hyperparameters may differ from the new model's). None for a weight file of no run."""
    if init.from_run:
        return open_run(init.from_run), None
    path = Path(init.weights).expanduser()
    if not path.is_file():
        raise UserError(f"weight file not found: {path}")
    run = _owning_run(path)
    return (run, path.resolve()) if run is not None else None


def source_from_run(source: Rebuilt) -> Source:
    """The rebuilt run's model (any task, auxiliary heads kept) as a source of starting weights."""
    run, data = source.run, source.config.data  # resolved at training time: num_classes is the data set's
    return Source(source.model, f"{run.path} ({source.checkpoint.relative_to(run.path)}, model built from its "
                                f"snapshotted model.py)", hparams=dict(source.config.model.hparams),
                  input_shape=(data.image_size, data.image_size, data.channels))


def source_from_file(path: Path, module: ModuleType, hparams: dict, input_shape: tuple) -> Source:
    """A weight file (of no run: `source_run`) loaded by layer order into a twin of the new model: `build` at
    the file's class count, or `backbone` for a no-top file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weight file not found: {path}")
    shapes = read_layer_shapes(path)
    if MAIN_OUTPUT in shapes:
        num_classes = shapes[MAIN_OUTPUT][0][-1]  # the kernel is (features, classes)
        twin = modelzoo.build_model(module, num_classes, input_shape, hparams)
        into = f"the model built for {num_classes} classes"
    elif callable(getattr(module, "backbone", None)):
        twin = module.backbone(input_shape=tuple(input_shape), **_accepted_kwargs(module.backbone, hparams))
        into = "the backbone"
    else:
        raise UserError(f"{path} has no {MAIN_OUTPUT!r} layer (a no-top file) and {module.__file__} has no "
                        f"backbone() to load it into; use the file with the classifier (include_top)")
    modelzoo.load_weight_file(twin, path)
    return Source(twin, f"{path} ({_file_format(path)}, loaded by layer order into {into})",
                  has_classifier=MAIN_OUTPUT in shapes)


def _owning_run(path: Path) -> Run | None:
    """The run whose checkpoints/ folder holds `path`, if any."""
    folder = path.resolve().parent
    if path.suffix == ".keras" and folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        return Run(folder.parent)
    return None


def _file_format(path: Path) -> str:
    if path.suffix == ".keras":
        return "Keras checkpoint"
    return "Keras 3 weights" if path.name.endswith(".weights.h5") else "Keras 2 HDF5"


def read_layer_shapes(path: Path) -> dict[str, list[tuple]]:
    """Layer name -> the shapes of its weights, in order, from a `.keras` archive, a Keras 3 `.weights.h5`
    or a Keras 2 `.h5` (weights only or a whole model); layers without weights are left out."""
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                buffer = io.BytesIO(archive.read("model.weights.h5"))
            with h5py.File(buffer, "r") as handle:
                return _keras3_layer_shapes(handle)
        with h5py.File(path, "r") as handle:
            if "layer_names" in handle.attrs or "model_weights" in handle:
                return _keras2_layer_shapes(handle.get("model_weights", handle))
            return _keras3_layer_shapes(handle)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a Keras weight file (.keras, .weights.h5 or Keras 2 .h5): "
                        f"{' '.join(str(error).split())[:200]}") from None


def _keras2_layer_shapes(group: h5py.Group) -> dict[str, list[tuple]]:
    """Keras 2 layout: the root lists `layer_names`; each layer's group lists its `weight_names`."""
    shapes = {}
    for name in (_text(n) for n in group.attrs["layer_names"]):
        weights = [tuple(group[name][_text(w)].shape) for w in group[name].attrs["weight_names"]]
        if weights:
            shapes[name] = weights
    return shapes


def _keras3_layer_shapes(handle: h5py.File) -> dict[str, list[tuple]]:
    """Keras 3 layout: layers/<class-based path>/vars/<index>, the layer's own name an attribute of vars."""
    shapes = {}
    for entry in handle.get("layers", {}).values():
        variables = entry.get("vars")
        if variables is not None and len(variables):
            shapes[_text(variables.attrs.get("name", entry.name))] = \
                [tuple(variables[key].shape) for key in sorted(variables, key=int)]
    return shapes


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def source_model(init: InitConfig, module: ModuleType, hparams: dict, input_shape: tuple,
                 source: Rebuilt | None) -> Source:
    """The model holding `init`'s starting weights: the rebuilt `source` run's (`source_run` names it), else
    the weight file's (`init.weights`)."""
    if source is not None:
        return source_from_run(source)
    if init.weights and not init.from_run:
        return source_from_file(Path(init.weights), module, hparams, input_shape)
    raise ValueError("init names a run that was not rebuilt, or no starting weights at all")


@contextlib.contextmanager
def named_init(init: InitConfig, where: str = "") -> Iterator[None]:
    """A UserError about the starting weights, prefixed with the config key that named them (and `where`)."""
    key = f"init.from_run {init.from_run}" if init.from_run else f"init.weights {init.weights}"
    try:
        yield
    except UserError as error:
        raise UserError(f"{key}{where}: {error}") from None


# ---------------------------------------------------------------- copying by name


@dataclass
class Matching:
    """How each layer with weights of the new model is served by the source."""
    copied: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)  # head layers the source lacks or shapes differently
    conflicts: list[str] = field(default_factory=list)  # non-head layers that do not fit, described
    unused: list[str] = field(default_factory=list)  # source layers the new model does not have


def match_layers(source: keras.Model, model: keras.Model, head: set[str]) -> Matching:
    """Pair the layers of `model` and `source` by name and compare their weight shapes."""
    theirs = {layer.name: layer for layer in _non_input_layers(source) if layer.weights}
    matching = Matching()
    for layer in _non_input_layers(model):
        if not layer.weights:
            continue
        other = theirs.get(layer.name)
        if other is not None and _shapes(other) == _shapes(layer):
            matching.copied.append(layer.name)
        elif layer.name in head:
            matching.reinitialized.append(layer.name)
        else:
            matching.conflicts.append(_conflict(other, layer))
    names = {layer.name for layer in model.layers}
    matching.unused = [name for name in theirs if name not in names]
    return matching


def _shapes(layer) -> list[tuple]:
    return [tuple(weight.shape) for weight in layer.weights]


def _conflict(theirs, ours) -> str:
    """How a layer of the new model differs from the source's layer of that name, in a few words."""
    if theirs is None:
        return f"{ours.name} is not in the source"
    if len(theirs.weights) != len(ours.weights):
        return (f"{ours.name} has {', '.join(w.name for w in theirs.weights)} in the source, "
                f"{', '.join(w.name for w in ours.weights)} here")
    there, here = next((a, b) for a, b in zip(theirs.weights, ours.weights) if a.shape != b.shape)
    return f"{ours.name} {here.name} is {tuple(there.shape)} in the source, {tuple(here.shape)} here"


def copy_weights(source: keras.Model, model: keras.Model, names: list[str]) -> None:
    """Set each named layer of `model` to the source layer's weights (batch-norm statistics included)."""
    for name in names:
        model.get_layer(name).set_weights(source.get_layer(name).get_weights())


def fix_suggestion(source: Source, hparams: dict, input_shape: tuple) -> str:
    """What to change so the two models agree: the differing hyperparameters, when the source's are known."""
    differences = []
    if source.hparams is not None:
        for name in sorted(set(source.hparams) | set(hparams)):
            there, here = _comparable(source.hparams.get(name)), _comparable(hparams.get(name))
            if there != here:
                differences.append(f"model.{name} {there!r} there, {here!r} here")
    if source.input_shape is not None and source.input_shape[-1] != input_shape[-1]:
        differences.append(f"data.channels {source.input_shape[-1]} there, {input_shape[-1]} here")
    if not differences:
        return "build the model with the hyperparameters the weights were saved with"
    return f"build it with the source's hyperparameters ({'; '.join(differences[:MAX_LISTED])})"


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


def _class_count(model: keras.Model) -> int | None:
    try:
        return model.get_layer(MAIN_OUTPUT).output.shape[-1]
    except ValueError:
        return None


def listed(names: list[str], limit: int = MAX_LISTED) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def describe(source: Source, model: keras.Model, matching: Matching) -> str:
    """One line for the run's notes: where the weights came from, and what of the head was not copied."""
    parts = [f"weights from {source.description}"]
    if matching.reinitialized:
        was, now = _class_count(source.model), _class_count(model)
        if not source.has_classifier:
            why = " (the source has no classifier)"
        elif MAIN_OUTPUT in matching.reinitialized and was is not None and was != now:
            why = f" for {now} classes (was {was})"
        else:
            why = " (not in the source, or shaped differently)"
        parts.append(f"head {listed(matching.reinitialized)} re-initialized{why}")
    else:
        parts.append("head copied too (same shapes)")
    if matching.unused:
        parts.append(f"source layers not in this model, ignored: {listed(matching.unused, 3)}")
    return "; ".join(parts)


def initialize_from(init: InitConfig, model: keras.Model, module: ModuleType, hparams: dict, input_shape: tuple,
                    where: str = "", source: Rebuilt | None = None) -> str:
    """Copy `init`'s starting weights into the freshly built `model`, layer by layer by name, and return a
    one-line description for the run's notes. Head layers whose shapes differ keep their fresh
    initialization; any other layer that the source lacks or shapes differently is a UserError naming the
    layers and the fix. `where` (e.g. " (in recipe.yaml)") follows the config key in error messages. `source`:
    the run `source_run` names, rebuilt (None for a weight file of no run)."""
    key = f"init.from_run {init.from_run}" if init.from_run else f"init.weights {init.weights}"
    source_rebuilt = source
    with named_init(init, where):
        source = source_model(init, module, hparams, input_shape, source)
    matching = match_layers(source.model, model, head_layer_names(module, model, hparams, input_shape))
    if matching.conflicts:
        raise UserError(f"{key}{where} does not fit this model outside its classifier head: "
                        f"{listed(matching.conflicts)}; {fix_suggestion(source, hparams, input_shape)}")
    copy_weights(source.model, model, matching.copied)
    described = describe(source, model, matching)
    changed = imported_form_changes(source_rebuilt.run if source_rebuilt is not None else None, hparams)
    if changed:
        warning = (f"the weights of {init.from_run or init.weights} were imported ({IMPORTED_FILE}) for a model "
                   f"with {changed}: in this model they compute another function; give it those options "
                   f"(--set model.KEY=VALUE)")
        print(f"warning: {warning}", flush=True)
        described += f"; imported for {changed}: another function here"
    return described


def imported_form_changes(run: Run | None, hparams: dict) -> str:
    """'' when `run` holds no imported weights or this model's options keep the form they were imported for (the
    options that compute the source framework's function: `form` in its imported.json), else those options as
    `key value (here: other)`."""
    form = ((run.imported() if run is not None else None) or {}).get("form") or {}
    return ", ".join(f"{key} {value} (here: {hparams.get(key)})" for key, value in sorted(form.items())
                     if hparams.get(key) != value)


# ---------------------------------------------------------------- freezing


def freeze_layers(model: keras.Model, patterns: list[str], head: set[str]) -> list[str]:
    """Set `trainable = False` on the layers whose names match any fnmatch pattern ("conv2_*"), and on every
    layer outside `head` for the pattern "backbone"; returns the frozen names in network order. Frozen batch
    norm also stops updating its statistics (Keras runs it in inference mode), as fine-tuning wants.
    Recompile the model afterwards."""
    layers = _non_input_layers(model)
    frozen = set()
    for pattern in patterns:
        if pattern == BACKBONE_PATTERN:
            matched = {layer.name for layer in layers if layer.name not in head}
        else:
            matched = {layer.name for layer in layers if fnmatch.fnmatchcase(layer.name, pattern)}
        if not matched:
            raise UserError(f"train.freeze pattern {pattern!r} matches no layer; {_name_examples(pattern, layers)}")
        frozen |= matched
    if not any(layer.trainable_weights for layer in layers if layer.name not in frozen):
        raise UserError(f"train.freeze {patterns} freezes every layer with weights, so nothing would train; "
                        f"leave the classifier head ({listed(sorted(head))}) out")
    for layer in layers:
        if layer.name in frozen:
            layer.trainable = False
    return [layer.name for layer in layers if layer.name in frozen]


def _name_examples(pattern: str, layers: list) -> str:
    names = [layer.name for layer in layers]
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
    if close:
        return f"did you mean {', '.join(close)}? (fnmatch patterns, e.g. conv2_*)"
    spread = names[:: max(1, len(names) // MAX_LISTED)][:MAX_LISTED]
    return f"layers are named like {', '.join(spread)}, ...; or use \"backbone\""


def unfreeze_all(model: keras.Model) -> None:
    """Make every layer trainable again (finetune_all after the head-only warm start); recompile after."""
    model.trainable = True
    for layer in model.layers:  # a functional model's setter does not reach its layers
        layer.trainable = True


def fresh_values(model: keras.Model, init: InitConfig) -> dict | None:
    """The freshly built model's trainable weights by variable path, which `shrink_and_perturb` draws on; None
    when the init does not shrink or perturb (nothing is copied)."""
    if init.shrink == 1.0 and init.perturb == 0.0:
        return None
    return {variable.path: variable.numpy() for variable in model.trainable_variables}


def shrink_and_perturb(model: keras.Model, fresh: dict, init: InitConfig) -> None:
    """Each trainable weight as loaded becomes init.shrink x itself + init.perturb x its fresh initialization
    (`fresh`, from `fresh_values` before loading): Ash & Adams 2020's shrink and perturb, which lets a model
    warm-started on part of the data generalize as one trained from scratch on all of it (non-trainable
    statistics, batch norm's moving averages, are left as loaded)."""
    for variable in model.weights:
        if variable.path in fresh:
            variable.assign(init.shrink * variable.numpy() + init.perturb * fresh[variable.path])
