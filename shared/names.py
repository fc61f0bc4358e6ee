"""Plain names: the user-given words that become one path component (a model name under the runs root, a
study name, a served model's name). A plain name cannot climb out of, or hide in, the folder it names a
child of, so nothing is written outside the runs root or the export folder."""

from __future__ import annotations

import os
import unicodedata

from shared.errors import UserError

MAX_NAME_BYTES = 255  # the longest file name common file systems accept


def plain_name_problem(value: object) -> str | None:
    """Why `value` is not a plain name, or None when it is one. Any Unicode letters are fine."""
    if not isinstance(value, str):
        return "is not text"
    if not value:
        return "is empty"
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if any(s in value for s in separators):
        return "holds a path separator"
    if "\x00" in value:
        return "holds a NUL character"
    if value in (".", ".."):
        return "is a relative folder"
    if value.startswith("."):
        return "starts with a dot (a hidden file)"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return "holds a control character (a newline, a tab)"
    if value != value.strip():
        return "starts or ends with a space"
    try:
        encoded = os.fsencode(value)
    except UnicodeEncodeError:
        return "cannot be a file name here (not valid UTF-8, or outside this locale's character set)"
    if len(encoded) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_plain_name(kind: str, value: object, where: str = "") -> str:
    """`value` if it is a plain name, else a UserError naming `kind` (e.g. "model.name"), the value and the
    rule it breaks. `where`: e.g. " (from models/x.yaml)"."""
    problem = plain_name_problem(value)
    if problem:
        raise UserError(f"{kind}{where} is {value!r}, which {problem}; it names a folder, so use a plain name "
                        f"such as resnet_v2 (no '/', '\\', '..', leading dot or control characters)")
    return value
