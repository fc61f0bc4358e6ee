"""The image formats: which are read, how, and the one decoder every path uses.

Training (every source), the TFRecord writers, the loop's ingestion, predict and the SavedModel's serving signature
all read an image through this module, so a file is decoded the same way everywhere or refused everywhere, in one
line that names it. TensorFlow's own decoders produce the pixels (they run inside `tf.data` and inside an exported
graph); this module adds what they lack:

- the header read first (`inspect`): format, size and orientation from a few bytes, so an image above
  `data.max_pixels` is refused before it is decoded, and so is a variant TensorFlow would decode wrongly or crash on;
- one channel rule: whatever the file holds (gray, gray + alpha, RGB, RGBA, palette, CMYK, 16 bits) becomes the
  model's 1 or 3 channels the same way (alpha dropped, RGB to gray by ITU-R 601 luma);
- EXIF orientation: a JPEG's stored pixels are turned the way its EXIF orientation tag says, as photo viewers and
  annotation tools show it, so a box drawn on the shown image lands on the same pixels here.

`FORMATS` is the table docs/configs-and-data.md prints. `facts(data)` runs the same graph code eagerly for Python
callers (writers, the loop's ingestion), and `verify` decodes once to prove the file decodes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import tensorflow as tf

from shared.data import checks

# The decoders, the eval views and the augmentation generators are written as graph code (tf.cond and
# tf.switch_case, Python `if` only on static values), so a function that calls them (a tf.data map, an export's
# serving signature) need not have autograph convert them: that conversion cost more than the rest of a pipeline's
# tracing (docs/testing.md, "traced without autograph").
graph_code = tf.autograph.experimental.do_not_convert

# (format, what is read, what is refused): the table of formats in docs/configs-and-data.md.
FORMATS = (
    ("JPEG", "baseline and progressive; grayscale, RGB and CMYK; EXIF orientation applied", "a variant "
     "TensorFlow's decoder cannot read, as a damaged file: 'does not decode (its reason)'"),
    ("PNG", "1, 2, 4, 8 and 16 bits; grayscale, RGB, palette; alpha dropped; 16 bits scaled to 8 (the high "
     "byte)", "-"),
    ("GIF", "the first frame", "-"),
    ("BMP", "24- and 32-bit", "1-, 4-, 8- and 16-bit (TensorFlow reads an 8-bit BMP's palette indices as gray "
     "levels, and none of the others); convert them to PNG"),
    ("WebP", "lossy and lossless still images; alpha dropped", "animated WebP (TensorFlow's decoder crashes the "
     "process on it)"),
    ("others", "-", "TIFF, HEIC/HEIF, AVIF, ICO, SVG, PDF, RAW: one line naming the file; convert them to JPEG or PNG"),
)

KINDS = ("unknown", "jpeg", "png", "gif", "bmp", "webp")  # `Header.kind` indexes this; `image/format` values
CONVERT = "convert it to PNG or JPEG"

# Every image takes one of three routes, each a branch of one functional Case (`routed`): a JPEG without EXIF,
# the common case, reads its size with TensorFlow's own header reader and decodes straight away; a JPEG with EXIF
# reads its orientation too and is turned; any other file has its header read against the table below. In a
# tf.data function each op costs about a microsecond whether it runs or not unless it sits in a branch not taken
# (scripts/bench_input.py measures the pipeline), so the common route holds as few as it can.
PLAIN_JPEG, EXIF_JPEG, OTHER = range(3)
EXIF_SCAN = 1024  # bytes of a JPEG searched for its EXIF segment (cameras and phones write it first or second)
EXIF_PATTERN = r"(?s)\C*?Exif\x00\x00\C*"  # \C: any byte, whatever UTF-8 says
EXIF_MARK = "Exif\x00\x00"
IFD_ENTRIES = 16  # IFD0's entries are sorted by tag: the orientation (0x0112) comes among the first
ORIENTATION_TAG = 0x0112

HEAD = 32  # bytes of any other file's header compared and read
DCT_RATIOS = (1, 2, 4, 8)  # libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 of each side (its DCT scaling)


def _signature(*parts: tuple[int, bytes]) -> list[int]:
    row = [-1] * HEAD  # -1: any byte
    for offset, expected in parts:
        row[offset:offset + len(expected)] = list(expected)
    return row


# (name, what its first bytes hold)
SIGNATURES = (
    ("png", ((0, b"\x89PNG\r\n\x1a\n"),)), ("ihdr", ((12, b"IHDR"),)),
    ("gif87", ((0, b"GIF87a"),)), ("gif89", ((0, b"GIF89a"),)), ("bmp", ((0, b"BM"),)),
    ("webp", ((0, b"RIFF"), (8, b"WEBP"))), ("vp8", ((12, b"VP8 "), (23, b"\x9d\x01\x2a"))),
    ("vp8l", ((12, b"VP8L"), (20, b"\x2f"))), ("vp8x", ((12, b"VP8X"),)),
    ("tiff-ii", ((0, b"II*\x00"),)), ("tiff-mm", ((0, b"MM\x00*"),)),
    *((f"heic-{brand}", ((4, b"ftyp" + brand.encode()),)) for brand in ("heic", "heix", "mif1", "hevc")),
    *((f"avif-{brand}", ((4, b"ftyp" + brand.encode()),)) for brand in ("avif", "avis")),
    ("ico", ((0, b"\x00\x00\x01\x00"),)), ("pdf", ((0, b"%PDF"),)), ("text", ((0, b"<"),)),
)
SIGNATURE_INDEX = {name: i for i, (name, _) in enumerate(SIGNATURES)}

# (name, offset, bytes, big-endian, divisor, modulus, added): the numbers a header may hold, read all at once
FIELDS = (
    ("png-width", 16, 4, True, 1, 0, 0), ("png-height", 20, 4, True, 1, 0, 0),
    ("gif-width", 6, 2, False, 1, 0, 0), ("gif-height", 8, 2, False, 1, 0, 0),
    ("bmp-header", 14, 4, False, 1, 0, 0),  # the DIB header's size: 12 for OS/2's core header, 40-124 the others
    ("bmp-width", 18, 4, False, 1, 0, 0), ("bmp-height", 22, 4, False, 1, 0, 0),  # negative: rows top-down
    ("bmp-bits", 28, 2, False, 1, 0, 0),
    ("core-width", 18, 2, False, 1, 0, 0), ("core-height", 20, 2, False, 1, 0, 0), ("core-bits", 24, 2, False, 1, 0, 0),
    ("vp8-width", 26, 2, False, 1, 16384, 0), ("vp8-height", 28, 2, False, 1, 16384, 0),
    ("vp8l-width", 21, 4, False, 1, 16384, 1), ("vp8l-height", 21, 4, False, 16384, 16384, 1),
    ("vp8x-width", 24, 3, False, 1, 0, 1), ("vp8x-height", 27, 3, False, 1, 0, 1),
    ("vp8x-flags", 20, 1, False, 1, 0, 0),  # 2: animated
    ("zero", 0, 0, False, 1, 0, 0),
)
FIELD_INDEX = {name: i for i, (name, *_) in enumerate(FIELDS)}
DAMAGED = "has a damaged {} header; " + CONVERT
# (signatures required, BMP header kind, format, height field, width field, bits field, refused as): the first
# variant whose signatures all match is the file's; "zero" for what a variant has not
VARIANTS = (
    (("png", "ihdr"), None, "png", "png-height", "png-width", "zero", ""),
    (("png",), None, "png", "zero", "zero", "zero", DAMAGED.format("PNG")),
    (("gif87",), None, "gif", "gif-height", "gif-width", "zero", ""),
    (("gif89",), None, "gif", "gif-height", "gif-width", "zero", ""),
    (("bmp",), "core", "bmp", "core-height", "core-width", "core-bits", ""),
    (("bmp",), "info", "bmp", "bmp-height", "bmp-width", "bmp-bits", ""),
    (("bmp",), None, "bmp", "zero", "zero", "zero", DAMAGED.format("BMP")),
    (("webp", "vp8"), None, "webp", "vp8-height", "vp8-width", "zero", ""),
    (("webp", "vp8l"), None, "webp", "vp8l-height", "vp8l-width", "zero", ""),
    (("webp", "vp8x"), None, "webp", "vp8x-height", "vp8x-width", "zero", ""),
    (("webp",), None, "webp", "zero", "zero", "zero", DAMAGED.format("WebP")),
    *(((name,), None, "unknown", "zero", "zero", "zero", f"is {what}; {CONVERT}") for name, what in (
        ("tiff-ii", "a TIFF image"), ("tiff-mm", "a TIFF image"),
        *((f"heic-{brand}", "a HEIC/HEIF image") for brand in ("heic", "heix", "mif1", "hevc")),
        ("avif-avif", "an AVIF image"), ("avif-avis", "an AVIF image"), ("ico", "an ICO icon"),
        ("pdf", "a PDF document"), ("text", "text or SVG, not an image"))),
    ((), None, "unknown", "zero", "zero", "zero", f"is not an image format that is read; {CONVERT}"),
)
BMP_BITS = ("is a ", "-bit BMP, which TensorFlow does not decode; " + CONVERT)
BMP_PALETTE = ("is an 8-bit BMP, whose palette TensorFlow does not apply (it reads the indices as gray levels); "
               + CONVERT)
ANIMATED = f"is an animated WebP, which TensorFlow's decoder cannot read; {CONVERT}"
EMPTY = f"is empty (0 bytes); remove it or {CONVERT}"
NO_PIXELS = f"has no pixels in its header (a damaged file); {CONVERT}"

# Orientation o (1-8) shows the stored pixels transposed (5-8), then reversed along these axes
TRANSPOSES = [[0, 1, 2]] * 4 + [[1, 0, 2]] * 4
REVERSED = [[False, False], [False, True], [True, True], [True, False], [False, False], [False, True],
            [True, True], [True, False]]
# ... and a window [top, left, height, width] of the shown image is this product with [top, left, height, width,
# stored rows, stored columns] of the stored pixels
WINDOWS = [
    [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
    [[1, 0, 0, 0, 0, 0], [0, -1, 0, -1, 0, 1], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
    [[-1, 0, -1, 0, 1, 0], [0, -1, 0, -1, 0, 1], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
    [[-1, 0, -1, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
    [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]],
    [[0, -1, 0, -1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]],
    [[0, -1, 0, -1, 1, 0], [-1, 0, -1, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]],
    [[0, 1, 0, 0, 0, 0], [-1, 0, -1, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]],
]


@dataclasses.dataclass
class Header:
    """What the first bytes of an encoded image say (tensors): its KINDS index, stored height and width,
    EXIF orientation (1-8; 1 where there is none), and why it is refused ("" when it is read)."""
    kind: tf.Tensor
    height: tf.Tensor
    width: tf.Tensor
    orientation: tf.Tensor
    problem: tf.Tensor

    @property
    def shown_shape(self) -> tf.Tensor:
        """[height, width] as shown: orientations 5-8 show the stored image transposed."""
        return tf.where(self.orientation >= 5, tf.stack([self.width, self.height]),
                        tf.stack([self.height, self.width]))


# ---------------------------------------------------------------- routes


def routed(route: tf.Tensor, branches: list[Callable]):
    """tf.switch_case that runs only the branch taken. In a tf.data function TensorFlow lowers a switch to
    Switch/Merge nodes, and there every op of every branch is still scheduled for every image. Kept a functional
    Case (its `_lower_using_switch_merge` attribute off: TensorFlow's own switch for this), only the taken branch
    runs."""
    from tensorflow.core.framework import attr_value_pb2

    outputs = tf.switch_case(route, branches)
    if tf.executing_eagerly():
        return outputs
    op = tf.nest.flatten(outputs)[0].op
    while op.type not in ("Case", "StatelessCase", "If", "StatelessIf"):
        op = op.inputs[0].op
    op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return outputs


def route_of(data: tf.Tensor) -> tf.Tensor:
    """PLAIN_JPEG, EXIF_JPEG or OTHER for an encoded image."""
    head = tf.strings.substr(data, 0, tf.minimum(EXIF_SCAN, tf.strings.length(data)))
    exif = tf.strings.regex_full_match(head, EXIF_PATTERN)
    return tf.where(tf.io.is_jpeg(data), tf.where(exif, EXIF_JPEG, PLAIN_JPEG), OTHER)


def _bytes(data: tf.Tensor, offset, length: int) -> tf.Tensor:
    """`length` bytes of `data` from `offset` as int64 values, zeros past the end."""
    raw = tf.strings.substr(data, tf.minimum(offset, tf.strings.length(data)), length)
    return tf.cast(tf.io.decode_raw(raw, tf.uint8, fixed_length=length), tf.int64)  # zero-padded


def _jpeg_size(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) of a JPEG, from TensorFlow's own header reader (which fails on a file that is no JPEG
    past its first marker)."""
    shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
    return shape[0], shape[1]


def _exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """Tag 0x0112 among the first IFD_ENTRIES entries of IFD0 of the TIFF structure after a JPEG's first
    "Exif\0\0" (1 when absent or not 1-8), in the structure's byte order."""
    head = tf.strings.substr(data, 0, tf.minimum(EXIF_SCAN, tf.strings.length(data)))
    tiff = tf.strings.length(tf.strings.split(head, sep=EXIF_MARK, maxsplit=1)[0]) + len(EXIF_MARK)
    header = _bytes(data, tiff, 8)
    motorola = tf.reduce_all(tf.equal(header[:4], tf.constant(list(b"MM\x00*"), tf.int64)))
    intel = tf.reduce_all(tf.equal(header[:4], tf.constant(list(b"II*\x00"), tf.int64)))
    four = tf.where(motorola, tf.constant([256 ** 3, 256 ** 2, 256, 1], tf.int64),
                    tf.constant([1, 256, 256 ** 2, 256 ** 3], tf.int64))
    two = tf.where(motorola, tf.constant([256, 1], tf.int64), tf.constant([1, 256], tf.int64))
    table = _bytes(data, tiff + tf.cast(tf.reduce_sum(header[4:8] * four), tf.int32), 2 + 12 * IFD_ENTRIES)
    entries = tf.reshape(table[2:], [IFD_ENTRIES, 12])
    tags, kinds, values = (tf.linalg.matvec(entries[:, start:start + 2], two) for start in (0, 2, 8))
    wanted = tf.equal(tags, ORIENTATION_TAG) & tf.equal(kinds, 3) \
        & (tf.range(IFD_ENTRIES, dtype=tf.int64) < tf.reduce_sum(table[:2] * two))  # SHORT, within the count
    value = tf.reduce_max(tf.where(wanted, values, tf.zeros_like(values)))  # one entry per tag
    return tf.where((motorola | intel) & (value >= 1) & (value <= 8), value, tf.constant(1, tf.int64))


@functools.cache
def _tables() -> dict:
    """The constant tables the other formats' header is multiplied, compared and gathered with."""
    weights = [[0] * HEAD for _ in FIELDS]
    for row, (_, offset, count, big, *_) in zip(weights, FIELDS):
        for i in range(count):
            row[offset + i] = 256 ** (count - 1 - i if big else i)
    conditions = len(SIGNATURES) + 2  # the signatures, then "a core BMP header", "another BMP header"
    required = [[False] * conditions for _ in VARIANTS]
    for row, (names, bmp_header, *_) in zip(required, VARIANTS):
        for name in names:
            row[SIGNATURE_INDEX[name]] = True
        if bmp_header:
            row[len(SIGNATURES) + (0 if bmp_header == "core" else 1)] = True
    signatures = [_signature(*parts) for _, parts in SIGNATURES]
    return {
        "weights": weights, "divisor": [f[4] for f in FIELDS], "modulus": [f[5] or 2 ** 40 for f in FIELDS],
        "added": [f[6] for f in FIELDS], "signed": [name == "bmp-height" for name, *_ in FIELDS],
        "signatures": signatures, "any_byte": [[b < 0 for b in row] for row in signatures],
        "not_required": [[not b for b in row] for row in required],
        "kind": [KINDS.index(v[2]) for v in VARIANTS],
        "fields": [[FIELD_INDEX[v[3]], FIELD_INDEX[v[4]], FIELD_INDEX[v[5]]] for v in VARIANTS],
        "refused": [v[6] for v in VARIANTS],
    }


def _other_header(data: tf.Tensor) -> Header:
    """The header of anything but a JPEG, from its first HEAD bytes: every signature compared at once, every
    number read at once, the first variant (VARIANTS) that matches."""
    tables = {key: tf.constant(value, tf.int64 if key in ("weights", "divisor", "modulus", "added", "signatures")
                               else None) for key, value in _tables().items()}
    head = _bytes(data, 0, HEAD)
    numbers = tf.linalg.matvec(tables["weights"], head) // tables["divisor"] % tables["modulus"] + tables["added"]
    numbers = tf.where(tables["signed"] & (numbers >= 2 ** 31), 2 ** 32 - numbers, numbers)
    matched = tf.reduce_all(tf.equal(tables["signatures"], head) | tables["any_byte"], axis=1)
    bmp_header = numbers[FIELD_INDEX["bmp-header"]]
    conditions = tf.concat([matched, [tf.equal(bmp_header, 12), (bmp_header >= 40) & (bmp_header <= 124)]], 0)
    variant = tf.argmax(tf.reduce_all(conditions | tables["not_required"], axis=1), output_type=tf.int32)
    height, width, bits = tf.unstack(tf.gather(numbers, tables["fields"][variant]))
    kind = tables["kind"][variant]
    animated = tf.equal(kind, KINDS.index("webp")) & matched[SIGNATURE_INDEX["vp8x"]] \
        & tf.equal(numbers[FIELD_INDEX["vp8x-flags"]] // 2 % 2, 1)
    bad_bits = tf.equal(kind, KINDS.index("bmp")) & tf.logical_not(tf.equal(bits, 24) | tf.equal(bits, 32))
    problems = tf.stack([tf.equal(tf.strings.length(data), 0), tf.not_equal(tables["refused"][variant], ""),
                         bad_bits, animated, (height < 1) | (width < 1), tf.constant(True)])
    bits_message = tf.where(tf.equal(bits, 8), BMP_PALETTE,
                            tf.strings.join([BMP_BITS[0], tf.strings.as_string(bits), BMP_BITS[1]]))
    messages = tf.stack([EMPTY, tables["refused"][variant], bits_message, ANIMATED, NO_PIXELS, ""])
    return Header(kind, height, width, tf.constant(1, tf.int64), messages[tf.argmax(tf.cast(problems, tf.int32))])


def _refused_if_too_big(header: Header, max_pixels: int | None) -> tf.Tensor:
    """The header's problem, or that it has more than `max_pixels` pixels."""
    if max_pixels is None:
        return header.problem
    pixels = header.height * header.width
    too_big = tf.strings.join(
        ["has ", tf.strings.as_string(header.width), "x", tf.strings.as_string(header.height), " = ",
         tf.strings.as_string(pixels), f" pixels, above data.max_pixels ({max_pixels}); downscale it, or raise "
         f"data.max_pixels if the memory it takes to decode is there"])
    return tf.where(tf.equal(header.problem, "") & (pixels > max_pixels), too_big, header.problem)


def _header(data: tf.Tensor, route: int) -> Header:
    """The header of an image known to take `route`."""
    if route == OTHER:
        return _other_header(data)
    height, width = _jpeg_size(data)
    orientation = _exif_orientation(data) if route == EXIF_JPEG else tf.constant(1, tf.int64)
    return Header(tf.constant(KINDS.index("jpeg")), height, width, orientation, tf.constant(""))


@graph_code
def inspect(data: tf.Tensor, max_pixels: int | None = None) -> Header:
    """The header of one encoded image (a tf.string scalar), read from its first bytes without decoding it;
    `problem` says why it is refused: an empty or unknown file, a variant TensorFlow decodes wrongly or not at
    all, or more than `max_pixels` pixels (None: no limit)."""
    def read(route):
        header = _header(data, route)
        return header.kind, header.height, header.width, header.orientation, _refused_if_too_big(header,
                                                                                                   max_pixels)
    return Header(*routed(route_of(data), [lambda route=route: read(route) for route in range(3)]))


def _required(header: Header, name: tf.Tensor | str, max_pixels: int | None) -> tf.Operation:
    """An op that fails, in one line naming the image, when the header (or its size) refuses it."""
    problem = _refused_if_too_big(header, max_pixels)
    return checks.check(tf.equal(problem, ""), "image ", name, " ", problem)


# ---------------------------------------------------------------- decoding


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Decoded pixels of 1-4 channels (gray, gray + alpha, RGB, RGBA) as `channels` (1 or 3): alpha dropped,
    gray repeated into RGB, RGB to gray by ITU-R 601 luma (tf.image.rgb_to_grayscale)."""
    have = image.shape[-1]
    if have is not None:  # known when the graph is built: no branch
        color = image[..., :3] if have >= 3 else None
        if channels == 3:
            return color if color is not None else tf.image.grayscale_to_rgb(image[..., :1])
        return tf.image.rgb_to_grayscale(color) if color is not None else image[..., :1]
    count = tf.shape(image)[-1]
    if channels == 3:
        out = tf.cond(count >= 3, lambda: image[..., :3], lambda: tf.image.grayscale_to_rgb(image[..., :1]))
    else:
        out = tf.cond(count >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1])
    return tf.ensure_shape(out, [None, None, channels])


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Stored pixels turned as EXIF orientation 1-8 says they are shown (PIL's ImageOps.exif_transpose)."""
    index = tf.cast(orientation - 1, tf.int32)
    turned = tf.transpose(image, tf.gather(tf.constant(TRANSPOSES), index))
    turned = tf.reverse(turned, tf.boolean_mask(tf.constant([0, 1]), tf.gather(tf.constant(REVERSED), index)))
    turned.set_shape([None, None, image.shape[-1]])
    return turned


def stored_window(window, orientation: tf.Tensor, stored_shape: tf.Tensor) -> tf.Tensor:
    """A window [top, left, height, width] of the shown image as the window of the stored pixels that shows it."""
    values = tf.concat([tf.cast(window, tf.int32), tf.cast(stored_shape, tf.int32)], 0)
    return tf.linalg.matvec(tf.gather(tf.constant(WINDOWS, tf.int32), tf.cast(orientation - 1, tf.int32)), values)


def _jpeg_pixels(data: tf.Tensor, channels: int, window: tf.Tensor | None = None,
                 target: int | None = None) -> tf.Tensor:
    """A JPEG (its stored `window` only, when given: `decode_and_crop_jpeg` skips the blocks outside it, the
    main saving of the ImageNet input pipeline) straight to 3 channels by libjpeg, which converts gray and CMYK;
    for 1 channel as stored, then `to_channels` (libjpeg cannot take CMYK to gray). With a `target` side (what
    the window is resized to next), the window is decoded at the smallest DCT scale that keeps it at least
    `target` on both sides (`dct_ratio`)."""
    def decoded(wanted):
        if window is None:
            return tf.io.decode_jpeg(data, channels=wanted)
        if target is None:
            return tf.image.decode_and_crop_jpeg(data, window, channels=wanted)
        branches = [lambda ratio=ratio: tf.image.decode_and_crop_jpeg(data, scaled_window(window, ratio),
                                                                        channels=wanted, ratio=ratio)
                    for ratio in DCT_RATIOS]
        return tf.switch_case(dct_ratio(window, target), branches)
    return decoded(3) if channels == 3 else to_channels(decoded(0), channels)


def dct_ratio(window: tf.Tensor, target: int) -> tf.Tensor:
    """The index in DCT_RATIOS of the largest ratio r with the window's shorter side at least r x `target`:
    libjpeg's DCT scaling then decodes 1/r of each side, never fewer than `target` pixels."""
    side = tf.minimum(window[2], window[3])
    return tf.reduce_sum(tf.cast(side >= tf.constant(DCT_RATIOS[1:], tf.int32) * target, tf.int32))


def scaled_window(window: tf.Tensor, ratio: int) -> tf.Tensor:
    """A window [top, left, height, width] of the full-size pixels in the pixels decoded at 1/`ratio`
    (`decode_and_crop_jpeg` takes its window there): the scaled pixels that cover it, so at least 1/ratio of
    its height and width, and inside the scaled image (ceil(side / ratio))."""
    top, left = window[0] // ratio, window[1] // ratio
    bottom, right = -((-(window[0] + window[2])) // ratio), -((-(window[1] + window[3])) // ratio)
    return tf.stack([top, left, bottom - top, right - left])


Window = Callable[[tf.Tensor], tf.Tensor]  # the shown [height, width] (int32) -> [top, left, height, width]


@graph_code
def decode_crop(data: tf.Tensor, channels: int, window: Window | None = None, max_pixels: int | None = None,
                name: tf.Tensor | str = "", target: int | None = None) -> tf.Tensor:
    """One encoded image as uint8 pixels as it is shown (the first frame, its EXIF orientation applied) of
    `channels`; only the window that `window` picks from its shown size, when given (None: all of it). Refused
    in one line naming it (`name`) when its header says so, before it is decoded. `target`: the side the window
    is resized to next; a JPEG window at least twice that is decoded at a DCT scale (1/2, 1/4, 1/8), never below
    `target` (None: at full size)."""
    def read(route):
        header = _header(data, route)
        with tf.control_dependencies([_required(header, name, max_pixels)]):
            shown = tf.cast(header.shown_shape, tf.int32)
            box = tf.cast(window(shown), tf.int32) if window is not None else None
            if route == PLAIN_JPEG:
                return _jpeg_pixels(data, channels, box, target)
            if route == EXIF_JPEG:
                stored = stored_window(box, header.orientation, tf.stack([header.height, header.width])) \
                    if box is not None else None
                return orient(_jpeg_pixels(data, channels, stored, target), header.orientation)
            image = to_channels(tf.io.decode_image(data, channels=channels if channels == 3 else 0,
                                                   expand_animations=False), channels)
            return image if box is None else tf.slice(image, tf.stack([box[0], box[1], 0]),
                                                      tf.stack([box[2], box[3], -1]))
    image = routed(route_of(data), [lambda route=route: read(route) for route in range(3)])
    image.set_shape([None, None, channels])
    return image


@graph_code
def decode(data: tf.Tensor, channels: int, max_pixels: int | None = None, name: tf.Tensor | str = "") -> tf.Tensor:
    """One encoded image as uint8 pixels (height, width, channels) as it is shown (`decode_crop`, whole)."""
    return decode_crop(data, channels, None, max_pixels, name)


# ---------------------------------------------------------------- for Python callers


@dataclasses.dataclass(frozen=True)
class Facts:
    """An image file's format (as `image/format` names it), its size as shown, and its EXIF orientation."""
    format: str
    width: int
    height: int
    orientation: int = 1


class Refused(ValueError):
    """Why an image is not read (one line, without the file's name: the caller names it)."""


@functools.cache
def _inspect_fn(max_pixels: int | None):
    @tf.function(input_signature=[tf.TensorSpec((), tf.string)], autograph=False)
    def run(data):
        header = inspect(data, max_pixels)
        shown = header.shown_shape
        return header.kind, shown[0], shown[1], header.orientation, header.problem
    return run


@functools.cache
def _verify_fn():
    @tf.function(input_signature=[tf.TensorSpec((), tf.string)], autograph=False)
    def run(data):
        # a JPEG decoded at 1/8 scale: its decoder still reads every byte of the stream (a truncated file
        # fails), for a fraction of a full decode
        return tf.cond(tf.io.is_jpeg(data), lambda: tf.shape(tf.io.decode_jpeg(data, ratio=8))[:2],
                       lambda: tf.shape(tf.io.decode_image(data, channels=0, expand_animations=False))[:2])
    return run


def facts(data: bytes, max_pixels: int | None = None) -> Facts:
    """The header of an encoded image, read by the graph code training and serving use; Refused says why
    it is not read. Reads the header only: `verify` proves the whole file decodes."""
    try:
        kind, height, width, orientation, problem = _inspect_fn(max_pixels)(tf.constant(data))
    except tf.errors.InvalidArgumentError as error:  # a JPEG whose header TensorFlow cannot parse
        raise Refused(f"does not decode ({_reason(error)})") from None
    if problem.numpy():
        raise Refused(problem.numpy().decode("utf-8", "replace"))
    return Facts(KINDS[int(kind)], int(width), int(height), int(orientation))


def verify(data: bytes, max_pixels: int | None = None) -> Facts:
    """`facts`, after decoding the image once with the training decoder (Refused when it does not decode)."""
    found = facts(data, max_pixels)
    try:
        _verify_fn()(tf.constant(data))
    except tf.errors.InvalidArgumentError as error:
        raise Refused(f"does not decode ({_reason(error)})") from None
    return found


def _reason(error: BaseException) -> str:
    """The decoder's own words in a TensorFlow error: the last line that is not the graph's trace."""
    import re

    lines = [line.strip() for line in (getattr(error, "message", None) or str(error)).splitlines()
             if line.strip() and not line.startswith("\t")
             and not line.strip().startswith(("File ", "Detected at node", "Graph execution error"))]
    text = re.sub(r"\{\{[^}]*\}\}|\[\[.*|\[Op:.*", "", lines[-1] if lines else "")
    return " ".join(text.split())[:120] or "damaged or truncated"
