"""An annotation tool's JSONL export, read in increments: one task a line,

    {"image": "photos/1.jpg" | "data:image/png;base64,...", "answer": "accept" | "reject" | "ignore",
     "label": ..., "spans": [...],               what the answer says: its task's `AnswerSchema` reads it
     "_input_hash": 11, "_task_hash": 21}        optional (Prodigy writes them)

`task_line(...)` writes that format (a simulated annotator, pre-annotations).
`read_new(path, offset, lines_before, schema, class_names)` reads the complete lines after byte `offset`, up
to `chunk_bytes` of accepted images at a time: a last line without its newline is still being written and is
left for the next read. Accepted tasks become `Example`s (the image's own bytes, checked to decode, and what
the task's schema reads from the line); rejected and ignored ones are only counted. A line that cannot be a
task (bad JSON, no image, an image that is missing, not a regular file, too large or does not decode, what
the schema refuses) is reported by its line number and skipped, never fatal. Relative image paths are
relative to the annotations file's folder.

Identity, as annotation tools have it: a task's input is its `_input_hash` (else its image: the path, or the
data URI's content), the question asked of it its `_task_hash` (else the input with its label or spans). Each
answer has a fingerprint (the question, the answer and what it says); `read_new(known=...)` skips the lines
whose fingerprint was taken before (a re-exported file), and `AnswerTable` keeps which accepted example each
input has now: the latest answer wins (a later accept of the same input replaces the earlier example; a later
reject or ignore of the same question withdraws it).
"""

from __future__ import annotations

import abc
import base64
import binascii
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import ClassVar, Container, Sequence

from shared.config_schema import DataConfig
from shared.data import formats
from shared.data.listing import UnreadableFile, read_image_bytes
from shared.errors import UserError

ANSWERS = ("accept", "reject", "ignore")
# the format's keys in which an answer says what its image shows (Prodigy's): part of each answer's fingerprint
SAID = ("label", "spans")
SHOWN_PROBLEMS = 10  # malformed lines named one by one in a report; the rest are counted
MAX_IMAGE_BYTES = DataConfig.max_image_bytes  # the default: an image file or data: URI above it is refused
MAX_PIXELS = DataConfig.max_pixels  # the default: an image above it (from its header) is refused
LINE_SLACK = 1 << 20  # bytes a line may hold besides its image (base64 makes the image 4/3 as long)


class Malformed(ValueError):
    """Why one line is not a usable task."""


@dataclasses.dataclass
class Example:
    """One accepted task: the image's own encoded bytes; a task's subclass adds what it shows."""
    line: int  # 1-based line number in the annotations file
    image: bytes
    image_format: str  # as TensorFlow names it: jpeg, png, gif, bmp
    width: int
    height: int
    name: str  # the image path, or "data URI of line N"

    def counted_class(self) -> int | None:
        """The one class the example is of, where it has one: the ledger records it, the loop counts it."""
        return None


class AnswerSchema(abc.ABC):
    """What a task's accepted line says about its image (beside `image` and `answer`), read into its Example."""
    example_type: ClassVar[type[Example]]

    @abc.abstractmethod
    def says(self, item: dict, width: int, height: int, index: dict[str, int]) -> dict:
        """The fields `example_type` adds to Example, read from the line `item` (an image of `width` x
        `height` pixels; `index`: class name -> index); Malformed says why the line cannot be one."""


@dataclasses.dataclass
class Answer:
    """One well-formed task line not taken before: who it is (for `AnswerTable`) and, accepted, its Example."""
    line: int
    answer: str  # accept, reject or ignore
    fingerprint: str  # the question, the answer and what it says: the same line again has the same one
    input: str | None  # the input's identity (None: a line without an image, which can only be counted)
    task: str | None  # the question's identity
    example: Example | None = None  # accepted ones
    image: str | None = None  # the image's own identity (its path, its data), whatever `_input_hash` says


@dataclasses.dataclass
class Batch:
    """What one read found after the byte offset it started from."""
    examples: list[Example]
    end_offset: int  # the byte after the last complete line read
    lines: int  # complete lines read (blank ones included)
    accepted: int = 0  # well-formed accepted tasks (= len(examples))
    rejected: int = 0
    ignored: int = 0
    malformed: list[str] = dataclasses.field(default_factory=list)  # "line N: why", one per skipped line
    waiting: bool = False  # a last line without its newline was left for later
    answers: list[Answer] = dataclasses.field(default_factory=list)  # the tasks not taken before, in file order
    duplicates: int = 0  # lines whose answer was taken before (`known`, or earlier in this read)
    more: bool = False  # stopped at `chunk_bytes`: lines may follow
    replaced: int = 0  # accepted examples that a later answer for the same input replaced (`AnswerTable`)
    withdrawn: int = 0  # accepted examples that a later reject / ignore of the same question withdrew

    def describe(self) -> str:
        """One line: the counts, then the malformed lines by number."""
        text = (f"{self.lines} new line(s): {self.accepted} accepted, {self.rejected} rejected, {self.ignored} "
                f"ignored, {len(self.malformed)} malformed")
        for count, what in ((self.duplicates, "already ingested (skipped)"),
                            (self.replaced, "replaced an earlier example of the same input"),
                            (self.withdrawn, "withdrew an earlier example (the same question answered again)")):
            if count:
                text += f", {count} {what}"
        if self.waiting:
            text += " (a last line without its newline waits for the next read)"
        if self.malformed:
            shown = "; ".join(self.malformed[:SHOWN_PROBLEMS])
            more = f"; and {len(self.malformed) - SHOWN_PROBLEMS} more" if len(self.malformed) > SHOWN_PROBLEMS else ""
            text += f"; skipped {shown}{more}"
        return text

    def add(self, other: Batch) -> None:
        """Another read's counts and lines added to these (its examples are not kept)."""
        self.end_offset, self.waiting, self.more = other.end_offset, other.waiting, other.more
        for key in ("lines", "accepted", "rejected", "ignored", "duplicates", "replaced", "withdrawn"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.malformed += other.malformed


@dataclasses.dataclass(frozen=True)
class Current:
    """The accepted example an input has now."""
    id: int  # the example's number (the loop's record of it)
    task: str  # the question it answered
    label: int | None = None  # classification: its class index


class AnswerTable:
    """Which accepted example each input has now, from the answers taken so far in file order: the latest
    answer wins. A later accept of the same input replaces its example (one label, or one set of boxes, an
    image); a later reject or ignore of the same question withdraws it; a reject or ignore of another question
    (another label asked of the same image) leaves it. Each fingerprint is taken once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()  # fingerprints taken: `read_new(known=...)`
        self.live: dict[str, Current] = {}  # input -> its example now

    def take(self, fingerprint: str, input: str | None, task: str | None, answer: str, id: int | None = None,
             label: int | None = None) -> tuple[bool, int | None]:
        """Take one answer (an accepted one with its example's `id`); returns (whether it was new, the id of
        the example it replaced or withdrew, else None)."""
        if fingerprint in self.seen:
            return False, None
        self.seen.add(fingerprint)
        if input is None:
            return True, None
        before = self.live.get(input)
        if answer == "accept":
            self.live[input] = Current(id, task, label)
            return True, before.id if before else None
        if before is not None and before.task == task:
            del self.live[input]
            return True, before.id
        return True, None

    def ids(self) -> set[int]:
        return {current.id for current in self.live.values()}

    def class_counts(self, num_classes: int) -> list[int]:
        counts = [0] * num_classes
        for current in self.live.values():
            if current.label is not None:
                counts[current.label] += 1
        return counts


def task_line(image: str, answer: str | None = None, label: str | None = None, spans: list[dict] | None = None,
              **extra) -> str:
    """One task as a JSONL line (newline included), in the format `read_new` reads: for a simulated annotator
    (answer set) or pre-annotations (no answer yet: the tool adds it; `extra` such as a score rides along)."""
    if answer is not None and answer not in ANSWERS:
        raise ValueError(f"answer {answer!r} is not one of {ANSWERS}")
    item = {"image": image, **({"answer": answer} if answer is not None else {}),
            **({"label": label} if label is not None else {}), **({"spans": spans} if spans is not None else {}),
            **extra}
    return json.dumps(item, ensure_ascii=False) + "\n"


def read_new(path: str | os.PathLike, offset: int = 0, lines_before: int = 0, schema: AnswerSchema | None = None,
             class_names: Sequence[str] = (), *, known: Container[str] = frozenset(),
             max_image_bytes: int = MAX_IMAGE_BYTES, max_pixels: int | None = MAX_PIXELS,
             chunk_bytes: int | None = None, digest=None) -> Batch:
    """The complete lines of the JSONL file `path` from byte `offset` on (`lines_before` lines precede it, for
    the line numbers), what accepted ones say read by the task's `schema` (labels among `class_names`). Lines
    whose answer's
    fingerprint is in `known`, or was met earlier in this read, are counted as duplicates, their images not
    read. `max_image_bytes`, `max_pixels`: data.max_image_bytes, data.max_pixels (an image above either is a
    malformed line). `chunk_bytes`: stop after the line that brings the accepted images read to that many bytes
    (Batch.more); None reads to the end. `digest`: a hashlib object updated with every byte consumed. UserError
    when the file is missing or shorter than `offset`."""
    if schema is None:
        raise ValueError("read_new needs the task's AnswerSchema (what an accepted line says)")
    path = Path(path).expanduser()
    index = {name: i for i, name in enumerate(class_names)}
    longest = max_image_bytes * 4 // 3 + LINE_SLACK  # a data: URI of the largest image, and the task around it
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < offset:
                raise UserError(f"annotations file {path} is {size} bytes, shorter than the {offset} already read: "
                                f"it must only be appended to; restore it, or start a new loop (loop.dir)")
            handle.seek(offset)
            batch = Batch(examples=[], end_offset=offset, lines=0)
            taken: set[str] = set()
            image_bytes = 0
            while chunk_bytes is None or image_bytes < chunk_bytes:
                raw, length, complete = _next_line(handle, longest)
                if not complete:  # the tool is still writing it (or nothing is left)
                    batch.waiting = bool(raw.strip())
                    break
                if digest is not None:
                    _update_digest(digest, handle, batch.end_offset, length, raw)
                batch.lines += 1
                batch.end_offset += length
                number = lines_before + batch.lines
                if raw is None:
                    batch.malformed.append(f"line {number}: longer than {longest} bytes (an image above "
                                           f"data.max_image_bytes {max_image_bytes}?)")
                    continue
                if not raw.strip():
                    continue
                try:
                    answer = parse_line(raw, number, path.parent, schema, index, known, taken, max_image_bytes,
                                        max_pixels)
                except Malformed as why:
                    batch.malformed.append(f"line {number}: {why}")
                    continue
                if answer is None:
                    batch.duplicates += 1
                    continue
                taken.add(answer.fingerprint)
                batch.answers.append(answer)
                if answer.answer == "accept":
                    batch.accepted += 1
                    batch.examples.append(answer.example)
                    image_bytes += len(answer.example.image)
                elif answer.answer == "reject":
                    batch.rejected += 1
                else:
                    batch.ignored += 1
            batch.more = chunk_bytes is not None and image_bytes >= chunk_bytes
    except OSError as error:
        raise UserError(f"cannot read annotations file {path} ({error.strerror or error}); "
                        f"check --annotations") from None
    return batch


def _next_line(handle, longest: int) -> tuple[bytes | None, int, bool]:
    """(the line, its length in bytes, complete): a line longer than `longest` is skipped to its newline
    without being held (None); an incomplete last line is not consumed (the handle goes back to its start)."""
    start = handle.tell()
    raw = handle.readline(longest + 1)
    if raw.endswith(b"\n"):
        return raw[:-1], len(raw), True
    if len(raw) <= longest:  # the end of the file: a line still being written
        handle.seek(start)
        return raw, 0, False
    length, head = len(raw), raw[:80]
    while True:  # too long: read on to its newline in blocks
        block = handle.readline(1 << 20)
        length += len(block)
        if block.endswith(b"\n"):
            return None, length, True
        if not block:
            handle.seek(start)
            return head, 0, False


def _update_digest(digest, handle, start: int, length: int, raw: bytes | None) -> None:
    """The consumed line's bytes into `digest` (a skipped, too-long line read again in blocks)."""
    if raw is not None:
        digest.update(raw + b"\n")
        return
    resume = handle.tell()
    handle.seek(start)
    while length:
        block = handle.read(min(length, 1 << 20))
        digest.update(block)
        length -= len(block)
    handle.seek(resume)


def prefix_digest(path: str | os.PathLike, length: int):
    """A sha256 hashlib object over the first `length` bytes of the file, or None when it is shorter (or gone:
    its reader then says so in one line)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while length:
                block = handle.read(min(length, 1 << 20))
                if not block:
                    return None
                digest.update(block)
                length -= len(block)
    except OSError:
        return None
    return digest


def parse_line(raw: bytes, number: int, base: Path, schema: AnswerSchema, index: dict[str, int],
               known: Container[str] = frozenset(), taken: Container[str] = frozenset(),
               max_image_bytes: int = MAX_IMAGE_BYTES, max_pixels: int | None = MAX_PIXELS) -> Answer | None:
    """The line's Answer (with its Example when accepted), None when its fingerprint is in `known` or
    `taken` (the same answer again); Malformed says why the line is no task."""
    try:
        item = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise Malformed(f"not JSON ({str(error).splitlines()[0][:80]})") from None
    if not isinstance(item, dict):
        raise Malformed(f"a JSON {type(item).__name__}, not an object")
    answer = item.get("answer")
    if answer not in ANSWERS:
        raise Malformed(f"answer is {brief(answer)}, not one of {', '.join(ANSWERS)}")
    image = item.get("image")
    if answer == "accept" and (not isinstance(image, str) or not image):
        raise Malformed("no image (a path or a data: URI)")
    input_key, task_key, fingerprint = identity(item, base)
    if fingerprint in known or fingerprint in taken:
        return None
    parsed = Answer(number, answer, fingerprint, input_key, task_key, image=image_identity(item, base))
    if answer != "accept":
        return parsed  # counted only: what it says is never trained on
    data, name = _image_bytes(image, number, base, max_image_bytes)
    image_format, width, height = image_facts(data, name, max_pixels)
    parsed.example = schema.example_type(number, data, image_format, width, height, name,
                                         **schema.says(item, width, height, index))
    return parsed


def identity(item: dict, base: Path) -> tuple[str | None, str, str]:
    """(input, question, fingerprint) of a task as annotation tools identify it: `_input_hash` / `_task_hash`
    where present, else the image (its path from `base`, or a hash of its data: URI) and the image with its
    label or spans; the fingerprint adds the answer and what it says to the question."""
    said = json.dumps([item.get(key) for key in SAID], sort_keys=True, ensure_ascii=False)
    input_key = f"input:{json.dumps(item['_input_hash'])}" if "_input_hash" in item else image_identity(item, base)
    task_key = f"task:{json.dumps(item['_task_hash'])}" if "_task_hash" in item else f"{input_key}|{said}"
    return input_key, task_key, _hash(json.dumps([task_key, item.get("answer"), said], ensure_ascii=False))


def image_identity(item: dict, base: Path) -> str | None:
    """A task's image as an input: `path:<normalized absolute path>` (a relative path from `base`), or a hash of
    its data: URI; None without an image."""
    image = item.get("image")
    if isinstance(image, str) and image.startswith("data:"):
        return f"data:{_hash(image)}"
    if isinstance(image, str) and image:
        path = Path(image).expanduser()
        return f"path:{os.path.normpath(path if path.is_absolute() else base / path)}"
    return None


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def brief(value) -> str:
    """A JSON value for a message, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def class_index(label, index: dict[str, int], what: str) -> int:
    """The index of the class name `label` (`what` names it in the Malformed that refuses anything else)."""
    if not isinstance(label, str):
        raise Malformed(f"{what} is {brief(label)}, not a class name")
    if label not in index:
        raise Malformed(f"{what} {label!r} is not a class of the model ({', '.join(list(index)[:5])}"
                        f"{' ...' if len(index) > 5 else ''})")
    return index[label]


def _image_bytes(image: str, number: int, base: Path, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes, str]:
    """The encoded image of a path (relative to `base`) or a base64 data: URI, and its name for messages:
    only a regular file (a FIFO would block, a device never end) of at most `max_bytes`."""
    if image.startswith("data:"):
        header, comma, payload = image.partition(",")
        if not comma or not header.endswith(";base64"):
            raise Malformed("image is a data: URI without ';base64,' (only base64 data URIs are read)")
        if len(payload) // 4 * 3 > max_bytes:
            raise Malformed(f"image is a data: URI of about {len(payload) // 4 * 3} bytes, above "
                            f"data.max_image_bytes {max_bytes}")
        try:
            return base64.b64decode(payload, validate=True), f"data URI of line {number}"
        except (binascii.Error, ValueError):
            raise Malformed("image is a data: URI whose base64 does not decode") from None
    path = Path(image).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        data = read_image_bytes(path, max_bytes)
    except UnreadableFile as why:
        raise Malformed(f"image {path} {why}") from None
    return data, str(path)


def image_facts(data: bytes, name: str, max_pixels: int | None = MAX_PIXELS) -> tuple[str, int, int]:
    """(format as `image/format` names it, width, height as shown) of an encoded image that the training decoder
    reads (`shared.data.formats`: its table of formats, EXIF orientation applied), else Malformed saying why."""
    try:
        found = formats.verify(data, max_pixels)
    except formats.Refused as why:
        raise Malformed(f"image {name} {why}") from None
    return found.format, found.width, found.height

