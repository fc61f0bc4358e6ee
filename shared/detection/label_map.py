"""Label lists and TF Object Detection API label maps (label_map.pbtxt): the class names in index order that
`detection.label_map` names, read and written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from shared.detection.records import read_annotation_text
from shared.errors import UserError


@dataclass
class LabelMapItem:
    id: int
    name: str
    display_name: str | None = None


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


def _strip_comments(text: str) -> str:
    """Drop `# ...` to the end of the line, except inside quotes."""
    return re.sub(r"""('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")|#[^\n]*""", lambda m: m.group(1) or "", text)


def _blocks(text: str) -> list[tuple[str, str]]:
    """Top-level `key { body }` (or `key: { body }`) blocks of protobuf text format, nested blocks kept in
    the body; quote-aware brace matching."""
    blocks, position = [], 0
    opener = re.compile(r"\s*([A-Za-z_]\w*)\s*:?\s*\{")
    while True:
        match = opener.match(text, position)
        if not match:
            if text[position:].strip():
                return blocks + [("", text[position:])]  # trailing garbage: reported by the caller
            return blocks
        depth, i, quote = 1, match.end(), None
        while i < len(text) and depth:
            char = text[i]
            if quote:
                if char == "\\":
                    i += 1
                elif char == quote:
                    quote = None
            elif char in "'\"":
                quote = char
            elif char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
            i += 1
        if depth:
            return blocks + [("", text[match.start():])]  # unclosed brace
        blocks.append((match.group(1), text[match.end():i - 1]))
        position = i


def parse_label_map(text: str, source: str = "label map") -> list[LabelMapItem]:
    """Parse a TF Object Detection API label_map.pbtxt (`item { id: 1 name: 'cat' display_name: 'Cat' }`,
    comments, single or double quotes, `item: {` and nested blocks such as keypoints allowed), in file order."""
    fix = "write it as item { id: 1 name: 'class' } blocks, ids from 1"
    items = []
    for key, body in _blocks(_strip_comments(text)):
        if key != "item":
            raise UserError(f"{source}: expected `item {{ ... }}` blocks, found {(key or body.strip())[:60]!r}; "
                            f"{fix}")
        flat = body
        while True:  # drop nested blocks (keypoints { ... }): their ids are not class ids
            stripped = re.sub(r"[A-Za-z_]\w*\s*:?\s*\{[^{}]*\}", " ", flat)
            if stripped == flat:
                break
            flat = stripped
        fields = dict((name, _unquote(value)) for name, value in re.findall(
            r"""([A-Za-z_]\w*)\s*:\s*('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"{}]+)""", flat))
        if "id" not in fields or not re.fullmatch(r"-?\d+", fields["id"]):
            raise UserError(f"{source}: item {{{' '.join(body.split())[:80]}}} has no whole-number id; {fix}")
        name = fields.get("name") or fields.get("display_name")
        if not name:
            raise UserError(f"{source}: item with id {fields['id']} has no name; {fix}")
        items.append(LabelMapItem(int(fields["id"]), name, fields.get("display_name")))
    if not items:
        raise UserError(f"{source} has no `item {{ id: N name: '...' }}` entries; {fix}")
    seen = set()
    for item in items:
        if item.id < 1:
            raise UserError(f"{source}: item {item.name!r} has id {item.id}; ids start at 1 (0 is the TF Object "
                            f"Detection API's background), renumber it")
        if item.id in seen:
            raise UserError(f"{source}: id {item.id} appears twice; give each item its own id")
        seen.add(item.id)
    return items


def read_label_map(path: str | os.PathLike) -> list[LabelMapItem]:
    """`parse_label_map` of a file."""
    path = Path(path).expanduser()
    return parse_label_map(read_annotation_text(path, "label map", "set detection.label_map to the label_map.pbtxt"),
                           str(path))


def label_map_names(items: list[LabelMapItem]) -> list[str]:
    """Class names in index order: items sorted by id, display_name where given, else name."""
    return [item.display_name or item.name for item in sorted(items, key=lambda item: item.id)]


def write_label_map(path: str | os.PathLike, class_names: Sequence[str]) -> None:
    """A label_map.pbtxt with id i + 1 for class_names[i] (name and display_name both the class name)."""
    def quote(name: str) -> str:
        return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"

    text = "".join(f"item {{\n  id: {i + 1}\n  name: {quote(name)}\n  display_name: {quote(name)}\n}}\n"
                   for i, name in enumerate(class_names))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a label list: a label_map.pbtxt (by id), or plain text with one name
    a line."""
    path = Path(path).expanduser()
    text = read_annotation_text(path, "label list", "set detection.label_map to a file with one class name a line")
    if re.search(r"^\s*item\s*:?\s*\{", _strip_comments(text), re.MULTILINE):
        return label_map_names(parse_label_map(text, str(path)))
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"label list {path} names no classes; write one class name a line")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"label list {path} names {duplicates[0]!r} twice; list each class once")
    return names
