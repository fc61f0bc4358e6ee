"""The YAML dialect of recipes and of a run's config.yaml: reading (exponent floats such as 1e-3 are numbers)
and writing (multi-line text as a literal block)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is text; YAML 1.2 and every user read a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


class YamlDumper(yaml.SafeDumper):
    """Multi-line text (notes) as a literal block, as it was typed; PyYAML falls back to a quoted
    string where a block cannot hold the text exactly."""


YamlDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def yaml_load(text: str):
    """A recipe's YAML, with exponent floats such as 1e-3 read as numbers."""
    return yaml.load(text, Loader=_YamlLoader)


class UnreadableYaml(ValueError):
    """Why a YAML file cannot be read: `where` (" at line N", or "") and `problem`, for its reader's one line."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{problem}{where}")
        self.where, self.problem = where, problem


def read_yaml_file(path: Path):
    """A YAML file's content (`yaml_load`); UnreadableYaml when it is not UTF-8 text or not YAML (with the line
    PyYAML reports)."""
    try:
        return yaml_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UnreadableYaml("", f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise UnreadableYaml(f" at line {mark.line + 1}" if mark else "",
                             str(getattr(error, "problem", None) or error)) from None

