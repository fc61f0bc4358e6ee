"""Run recipes: YAML files with `extends`, `--set` overrides in dot notation, strict validation. The entry point
that loads a config: `load_config` (a recipe file or a tree) and `from_dict` (a tree).

The schema is `shared.config_schema`: every key a user may write, its type, its default. Anything else
is an error naming the key, the file it came from and the closest valid key. Every number is finite and
in the range `shared.config_validation.RANGES` gives its key, checked when the config loads, before any folder
exists. `model` is open-ended: besides `name` and `path` it holds the model's own hyperparameters, which
`shared.modelzoo` checks against the model's `build` signature.

A loaded Config is deeply frozen: the run lifecycle resolves it once (`shared.lifecycle.prepare`: hyperparameters,
class count, normalization statistics, absolute paths) into a new value with `with_changes`, and nothing
changes it afterwards (an assignment raises dataclasses.FrozenInstanceError; its lists are tuples and its
mappings read-only, see `shared.config_schema`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from shared.config_schema import Config, ModelConfig, section_type
from shared.config_validation import (check_consistency, check_value, closest_key, ints_to_floats, matches_type,
                                      type_name, where_from)
from shared.config_yaml import UnreadableYaml, read_yaml_file, yaml_load
from shared.errors import UserError
from shared.frozen import thaw
from shared.names import check_plain_name

SET_SOURCE = "--set"


# ---------------------------------------------------------------- loading and merging


def deep_merge(base: dict, override: dict) -> dict:
    """`override` wins; nested mappings merge key by key, everything else is replaced whole."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _provenance(tree: dict, source: str, prefix: str = "") -> dict[str, str]:
    """Which file (or --set) each dotted key came from, so errors can point at it."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, dict):
            out.update(_provenance(value, source, dotted + "."))
    return out


def read_yaml(path: Path, chain: tuple = ()) -> tuple[dict, dict[str, str]]:
    """Read one recipe, following `extends:` (relative to the file); returns (tree, provenance)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"config extends itself in a loop: {cycle}; remove one of the `extends:` lines")
    if not path.is_file():
        hint = f" (extended by {chain[-1]})" if chain else ""
        raise UserError(f"config file not found: {path}{hint}; check the path")
    try:
        tree = read_yaml_file(path) or {}
    except UnreadableYaml as why:
        if not why.where and why.problem.startswith("not UTF-8"):
            raise UserError(f"config {path} is {why.problem}; save it as UTF-8") from None
        raise UserError(f"config {path}{why.where} is not valid YAML: {why.problem}; fix the syntax") from None
    if not isinstance(tree, dict):
        raise UserError(f"config {path} must be a mapping of sections (model:, data:, train:, run:)")
    parents = tree.pop("extends", None) or []
    merged, provenance = {}, {}
    for parent in [parents] if isinstance(parents, str) else parents:
        parent_tree, parent_provenance = read_yaml(path.parent / parent, (*chain, path))
        merged = deep_merge(merged, parent_tree)
        provenance.update(parent_provenance)
    provenance.update(_provenance(tree, str(path)))
    return deep_merge(merged, tree), provenance


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.batch_size=64` -> (["train", "batch_size"], 64); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r} is not key=value; write e.g. --set train.batch_size=64")
    stripped = raw.strip()
    try:
        value = yaml_load(stripped) if stripped else None
    except yaml.YAMLError:
        value = stripped  # "a: b: c" is no YAML value, but a fine note
    if isinstance(value, (dict, list)) and not stripped.startswith(("{", "[")):
        value = stripped  # only flow style ([1, 2], {a: 1}) makes a collection; "hello: world" stays text
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    provenance = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
        for depth in range(1, len(keys) + 1):
            provenance[".".join(keys[:depth])] = SET_SOURCE
    return tree, provenance


def load_config(path: str | Path | None = None, overrides: list[str] = (), tree: dict | None = None) -> Config:
    """Read a recipe (or take `tree`), apply `--set` overrides and validate everything but the model
    hyperparameters (those need the model's code: see `shared.modelzoo.resolve_hparams`)."""
    provenance: dict[str, str] = {}
    if path is not None:
        tree, provenance = read_yaml(Path(path))
    tree = dict(tree or {})
    tree, set_provenance = apply_overrides(tree, list(overrides))
    provenance.update(set_provenance)
    return dataclasses.replace(from_dict(tree, provenance),
                               source_file=str(Path(path).resolve()) if path is not None else None)


# ---------------------------------------------------------------- building a Config


def _build_section(section, tree: dict, provenance: dict, prefix: str):
    if not isinstance(tree, dict):
        section_key = prefix.rstrip(".")
        raise UserError(f"config key {section_key} must be a mapping{where_from(section_key, provenance)}")
    fields = {f.name: f for f in dataclasses.fields(section) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in fields or key == "hparams":
            candidates = [f"{prefix}{k}" for k in fields if k != "hparams"]
            raise UserError(f"unknown config key {dotted}{where_from(dotted, provenance)}"
                            f"{closest_key(dotted, candidates)}")
        f = fields[key]
        sub = section_type(f.type)
        if sub:
            kwargs[key] = _build_section(sub, value or {}, provenance, dotted + ".")
            continue
        if not matches_type(value, f.type):
            raise UserError(f"config key {dotted}{where_from(dotted, provenance)} must be {type_name(f.type)}, "
                            f"got {value!r}")
        value = ints_to_floats(value, f.type)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:  # null: a key that may be off
            raise UserError(f"config key {dotted}{where_from(dotted, provenance)} is {value!r}; "
                            f"choose one of {', '.join(map(str, choices))}")
        check_value(dotted, value, provenance)
        kwargs[key] = value
    return section(**kwargs)


def from_dict(tree: dict, provenance: dict[str, str] | None = None) -> Config:
    """The Config a tree of sections (a recipe as YAML reads it) describes, every key and value checked
    (`shared.config_validation`); a UserError names the first bad key and the file it came from."""
    provenance = provenance or {}
    tree = thaw(tree)  # a plain copy: the checks read YAML's types, and the caller's tree stays the caller's
    model_tree = tree.pop("model", None) or {}
    if not isinstance(model_tree, dict):
        raise UserError(f"config key model must be a mapping{where_from('model', provenance)}")
    config = _build_section(Config, tree, provenance, "")
    model_tree = dict(model_tree)
    name = model_tree.pop("name", "resnet")
    path = model_tree.pop("path", None)
    # The name is a folder of the runs root (with or without model.path), so it must be a plain name.
    check_plain_name("config key model.name", name, where_from("model.name", provenance))
    if path is not None and not isinstance(path, str):
        raise UserError(f"config key model.path{where_from('model.path', provenance)} must be a folder path, "
                        f"got {path!r}")
    check_value("model", {"name": name, "path": path, **model_tree}, provenance)
    if config.tune.study is not None:
        check_plain_name("config key tune.study", config.tune.study, where_from("tune.study", provenance))
    config = dataclasses.replace(config, model=ModelConfig(name=name, path=path, hparams=model_tree),
                                 provenance=provenance)
    check_consistency(config, provenance)
    return config
