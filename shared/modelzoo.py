"""Find a model folder, import its `model.py` from a path, and check the config's hyperparameters
against its `build` signature.

Importing from a path (not as a package) is what lets a run rebuild its model from the copy of
`model.py` inside its own snapshot, long after `models/<name>/model.py` has moved on.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

from shared import keras_saving
from shared.errors import UserError
from shared.names import check_plain_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = PROJECT_ROOT / "models"
BUILD_ARGS = ("num_classes", "input_shape")  # supplied by the runner from the data, not by the config
KERAS_VARIABLES = "model.weights.h5"  # the member of a .keras archive that holds the variables (Keras' own layout)
MAIN_OUTPUT = "predictions"  # a model with auxiliary heads returns a dict; this key is the classifier


def available_models() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "model.py").is_file()) if MODELS_DIR.is_dir() else []


def model_dir(name: str, path: str | None = None) -> Path:
    """The folder holding the model's source: `path` when given, else models/<name>."""
    folder = Path(path) if path else MODELS_DIR / check_plain_name("model", name)  # not ../elsewhere
    if not (folder / "model.py").is_file():
        known = available_models()
        match = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {match[0]}?" if match else f"available: {', '.join(known) or 'none'}"
        raise UserError(f"unknown model {name!r}: no model.py in {folder}; {hint}")
    return folder


def import_file(path: Path, module_name: str) -> ModuleType:
    """Import one Python file under a unique name (two runs' model.py may be loaded side by side)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # keras serialization looks modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise UserError(f"{path} failed to import: {type(error).__name__}: {error}; fix the model source") from error
    return module


def load_model_module(folder: Path) -> ModuleType:
    folder = Path(folder).resolve()
    module = import_file(folder / "model.py", f"_model_{abs(hash(str(folder)))}")
    if not callable(getattr(module, "build", None)):
        raise UserError(f"{folder / 'model.py'} has no build(num_classes, input_shape, **hparams) function")
    return module


def load_augment_module(folder: Path) -> ModuleType | None:
    """The model folder's own augmentation generators (`augment.py`), if it has any."""
    path = Path(folder).resolve() / "augment.py"
    return import_file(path, f"_augment_{abs(hash(str(path)))}") if path.is_file() else None


def hparam_defaults(module: ModuleType) -> dict:
    """The model's hyperparameters and their defaults, from `build`'s signature."""
    parameters = inspect.signature(module.build).parameters
    return {name: p.default for name, p in parameters.items()
            if name not in BUILD_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def resolve_hparams(module: ModuleType, hparams: dict, where: str = "") -> dict:
    """Every hyperparameter of `build`, the config's value where given, else the default; unknown names
    and values of the wrong type are errors naming the closest valid hyperparameter."""
    defaults = hparam_defaults(module)
    resolved = {}
    for name, value in hparams.items():
        if name not in defaults:
            match = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f"did you mean model.{match[0]}?" if match else f"valid: {', '.join(sorted(defaults)) or 'none'}"
            raise UserError(f"unknown config key model.{name}{where}: build() takes no such argument; {hint}")
        default = defaults[name]
        if default is not inspect.Parameter.empty and default is not None and value is not None:
            expected = type(default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif expected is tuple and isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
                raise UserError(f"config key model.{name}{where} must be {expected.__name__} "
                                f"(like its default {default!r}), got {value!r}")
        resolved[name] = value
    for name, default in defaults.items():
        if name not in resolved:
            if default is inspect.Parameter.empty:
                raise UserError(f"config key model.{name} is required by build(){where}; set it")
            resolved[name] = list(default) if isinstance(default, tuple) else default
    return resolved


def build_model(module: ModuleType, num_classes: int, input_shape: tuple, hparams: dict):
    """Call the model's `build`; a ValueError from it (a bad depth, say) is the user's to fix."""
    keras_saving.install()  # the model's checkpoints save and load without Keras redoing its skip sets per layer
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}
    try:
        return module.build(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    except (ValueError, TypeError) as error:
        raise UserError(f"model could not be built with {kwargs}: {error}") from error


def auxiliary_loss_weights(module: ModuleType, model) -> dict[str, float]:
    """For a model whose outputs are a dict (main classifier + auxiliary heads, like GoogLeNet's), the
    training loss weight of each auxiliary head, from the model file's AUX_LOSS_WEIGHTS; {} otherwise."""
    if not isinstance(model.output, dict):
        return {}
    names = set(model.output)
    if MAIN_OUTPUT not in names:
        raise UserError(f"{module.__file__}: a model with several outputs must name its classifier "
                        f"{MAIN_OUTPUT!r}; it has {sorted(names)}")
    weights = dict(getattr(module, "AUX_LOSS_WEIGHTS", {}))
    missing = names - {MAIN_OUTPUT} - set(weights)
    if missing:
        raise UserError(f"{module.__file__}: no AUX_LOSS_WEIGHTS entry for output(s) {sorted(missing)}")
    return {name: float(weights[name]) for name in sorted(names - {MAIN_OUTPUT})}


def inference_model(model):
    """The classifier alone: auxiliary heads dropped, weights shared (for testing and export)."""
    if not isinstance(model.output, dict):
        return model
    import keras

    return keras.Model(model.input, model.output[MAIN_OUTPUT], name=model.name)


def load_weight_file(model, path, what: str = "model") -> None:
    """Load a Keras weight file into `model`: a run's `.keras` checkpoint, a `.weights.h5`, or a Keras 2
    `.h5` such as Keras Applications' ImageNet downloads (matched by layer order). A file that does not
    fit (another depth, a missing bias, a different class count) is a UserError, not a trace."""
    import warnings

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weight file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns once per unmatched layer before it raises
            if path.suffix == ".keras":
                _load_archive_weights(model, path)
            else:
                model.load_weights(str(path))
    except zipfile.BadZipFile as error:
        raise UserError(f"weight file {path} is damaged or not a Keras archive ({error}): give a .keras file a run or "
                        f"model.save() wrote, or a .weights.h5") from None
    except (ValueError, KeyError, OSError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"weight file {path} does not fit the {what}: {reason}; build the model with the "
                        f"hyperparameters the file was saved with") from None


def _load_archive_weights(model, path: Path) -> None:
    """`model.load_weights` of a .keras archive, from its variables file unpacked to a temporary folder first: h5py
    seeks back and forth in that file, and Python's zipfile before 3.13 reads a member again from its start at
    each seek back, which made a ResNet-50 checkpoint several times slower to load in place (docs/runs.md)."""
    with zipfile.ZipFile(path) as archive, contextlib.ExitStack() as cleanup:
        if KERAS_VARIABLES not in archive.namelist():  # another zip, or Keras' npz layout (load_weights reads h5 only)
            held = ", ".join(sorted(archive.namelist())[:5]) or "nothing"
            raise UserError(f"weight file {path} holds no {KERAS_VARIABLES} (it holds {held}): give a .keras file a "
                            f"run or model.save() wrote, or a .weights.h5")
        try:
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="weights-"))
            unpacked = archive.extract(KERAS_VARIABLES, scratch)
        except OSError:  # no room for the copy: read the variables in the archive, slowly
            unpacked = path
        model.load_weights(str(unpacked))
