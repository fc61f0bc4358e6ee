"""The search space of a study: `tune.space` read into Optuna distributions (each key checked against the
recipe and the model's build()), a trial's values sampled from them and applied to the recipe.

Space entries: `{choice: [a, b]}`, `{int: [lo, hi], step: 2, log: false}`, `{float: [lo, hi], log: true}`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from shared import config as config_module
from shared import modelzoo
from shared.config_schema import Config
from shared.frozen import thaw
from shared.errors import UserError

SPEC_KINDS = ("choice", "int", "float")
SPEC_OPTIONS = {"choice": (), "int": ("step", "log"), "float": ("step", "log")}


def parse_space(space: dict, base_config: Config) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions, keyed by dotted config key, in the given order.

    Nested mappings (what `--set tune.space.model.width=...` makes) are read as dotted keys. Every
    key is checked by applying each choice (or both ends of the range) to the base config and
    validating it the way a recipe is, so a typo gets the config's own did-you-mean message; model
    hyperparameters are checked against the model's build() signature."""
    flat = _flatten_space(thaw(space or {}))  # a config's frozen space as YAML's lists and dicts
    if not flat:
        raise UserError("tune.space is empty; give at least one key to search, e.g. "
                        "train.lr.base: {float: [0.01, 0.3], log: true}")
    distributions = {key: _parse_spec(key, spec) for key, spec in flat.items()}
    _check_keys(distributions, base_config)
    return distributions


def _flatten_space(space: dict, prefix: str = "") -> dict:
    if not isinstance(space, dict):
        raise UserError(f"tune.space{'.' + prefix.rstrip('.') if prefix else ''} must be a mapping of dotted "
                        f"config keys to specs, e.g. train.lr.base: {{float: [0.01, 0.3], log: true}}")
    flat = {}
    for key, spec in space.items():
        dotted = f"{prefix}{key}"
        # A mapping of mappings with no spec kind in it is a section: --set writes keys that way.
        if isinstance(spec, dict) and spec and not set(spec) & set(SPEC_KINDS) \
                and all(isinstance(value, dict) for value in spec.values()):
            flat.update(_flatten_space(spec, dotted + "."))
        else:
            flat[dotted] = spec
    return flat


def _parse_spec(key: str, spec: Any) -> BaseDistribution:
    where = f"tune.space.{key}"
    example = "{choice: [a, b]}, {int: [lo, hi]} or {float: [lo, hi], log: true}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} is {spec!r}; write a spec such as {example}")
    kinds = [k for k in spec if k in SPEC_KINDS]
    if len(kinds) != 1:
        if kinds:
            raise UserError(f"{where} gives {' and '.join(kinds)}; give exactly one of {', '.join(SPEC_KINDS)}")
        unknown = next((k for k in spec if k not in ("step", "log")), None)
        match = difflib.get_close_matches(str(unknown), SPEC_KINDS, n=1, cutoff=0.5) if unknown else []
        hint = f"did you mean {match[0]}?" if match else f"write a spec such as {example}"
        raise UserError(f"{where}: unknown spec kind {unknown!r}; {hint}" if unknown
                        else f"{where} has no spec kind; {hint}")
    kind = kinds[0]
    extra = [k for k in spec if k != kind and k not in SPEC_OPTIONS[kind]]
    if extra:
        allowed = ", ".join(SPEC_OPTIONS[kind]) or "nothing"
        raise UserError(f"{where}: {extra[0]!r} does not go with {kind} (allowed beside it: {allowed})")
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: choice must be a non-empty list of values, got {value!r}; "
                            f"e.g. {{choice: [4, 8, 16]}}")
        bad = [v for v in value if v is not None and not isinstance(v, (bool, int, float, str))]
        if bad:
            raise UserError(f"{where}: choice {bad[0]!r} is not a single value (number, string, true/false, "
                            f"null); search a scalar key instead")
        return CategoricalDistribution(value)
    number = int if kind == "int" else (int, float)
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, number) and not isinstance(v, bool) for v in value)):
        raise UserError(f"{where}: {kind} must be [low, high] of {'integers' if kind == 'int' else 'numbers'}, "
                        f"got {value!r}")
    low, high = value
    if not low < high:
        raise UserError(f"{where}: range [{low}, {high}] is empty or inverted; write [low, high] with low < high "
                        f"(one value: use {{choice: [{low}]}})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: a log range must start above 0, got [{low}, {high}]; raise the low end "
                        f"(e.g. {high / 1000:g}) or drop log: true")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise UserError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, "
                            f"got {step!r}")
        if log and step != 1:
            raise UserError(f"{where}: step and log: true do not combine; keep one")
        if kind == "int" and (high - low) % step:
            raise UserError(f"{where}: [{low}, {high}] is not a whole number of steps of {step}; "
                            f"make the high end {high - (high - low) % step}")
    if kind == "int":
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def candidate_values(distribution: BaseDistribution) -> list:
    """Values that stand for the whole distribution when validating: every choice, or both ends."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def grid_values(distribution: BaseDistribution) -> list | None:
    """All values of a finite distribution (a choice, an int range); None for a float range."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    return None


def _check_keys(distributions: dict[str, BaseDistribution], base_config: Config) -> None:
    tree = base_config.to_dict()
    tree.pop("tune", None)
    provenance = {**base_config.provenance, **{key: "tune.space" for key in distributions}}
    model_module = None
    varies_model = {"model.name", "model.path"} & set(distributions)
    for key, distribution in distributions.items():
        if key == "tune" or key.startswith("tune."):
            raise UserError(f"tune.space.{key}: the tune section itself cannot be searched; remove the key")
        for value in candidate_values(distribution):
            candidate = copy.deepcopy(tree)
            set_dotted(candidate, key, value)
            try:
                config_module.from_dict(candidate, provenance)
            except UserError as error:
                raise UserError(f"tune.space: {error}") from None
        # model.* beyond name and path are build() arguments: the config does not know them, the model does.
        if key.startswith("model.") and key not in ("model.name", "model.path") and not varies_model:
            if model_module is None:
                folder = modelzoo.model_dir(base_config.model.name, base_config.model.path)
                model_module = modelzoo.load_model_module(folder)
            name = key.split(".", 1)[1]
            for value in candidate_values(distribution):
                modelzoo.resolve_hparams(model_module, {**base_config.model.hparams, name: value},
                                         " (from tune.space)")


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree[a][b][c] = value for key a.b.c, making missing sections on the way."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise UserError(f"tune.space.{key}: {'.'.join(parts[:depth + 1])} is a value, not a section; "
                            f"check the key")
        node = child
    node[parts[-1]] = value


def trial_config(base_config: Config, values: dict[str, Any], notes: str) -> Config:
    """The base config with the trial's values applied, the tune section dropped (the run's
    config.yaml then trains as it is) and `notes` as run.notes."""
    tree = base_config.to_dict()  # a fresh plain tree
    tree.pop("tune", None)
    for key, value in values.items():
        set_dotted(tree, key, value)
    tree["run"]["notes"] = notes
    provenance = {**base_config.provenance, **{key: "tune" for key in values}}
    return dataclasses.replace(config_module.from_dict(tree, provenance), source_file=base_config.source_file)


def describe_values(values: dict[str, Any]) -> str:
    return " ".join(f"{key}={format_value(value)}" for key, value in values.items())


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def suggest(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, list(distribution.choices))
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(key, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)
