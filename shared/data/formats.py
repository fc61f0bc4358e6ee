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

`FORMATS` is the table the README prints. `facts(data)` runs the same graph code eagerly for Python callers
(writers, the loop's ingestion), and `verify` decodes once to prove the file decodes.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf

from shared.data import checks

# (format, what is read, what is refused): the README's table of formats.
FORMATS = (
    ("JPEG", "baseline and progressive; grayscale, RGB and CMYK; EXIF orientation applied", "a variant "
     "TensorFlow's decoder cannot read, as a damaged file: 'does not decode (its reason)'"),
    ("PNG", "1, 2, 4, 8 and 16 bits; grayscale, RGB, palette; alpha dropped; 16 bits scaled to 8 (the high "
     "byte)", "-"),
    ("GIF", "the first frame", "-"),
    ("BMP", "24- and 32-bit; 8-bit grayscale", "1-, 4- and 16-bit, and 8-bit with a colour palette (TensorFlow "
     "reads the palette's indices as gray levels); convert them to PNG"),
    ("WebP", "lossy and lossless still images; alpha dropped", "animated WebP (TensorFlow's decoder crashes the "
     "process on it)"),
    ("others", "-", "TIFF, HEIC/HEIF, AVIF, ICO, SVG, PDF, RAW: one line naming the file; convert them to JPEG or PNG"),
)

KINDS = ("unknown", "jpeg", "png", "gif", "bmp", "webp")  # `Header.kind` indexes this; `image/format` values
HEADER_BYTES = 64
EXIF_SCAN_BYTES = 65_536  # the EXIF segment sits among the first segments of a JPEG, before the image data
EXIF_MARK = "Exif\x00\x00"
MAX_IFD_ENTRIES = 64
ORIENTATION_TAG = 0x0112
CONVERT = "convert it to PNG or JPEG"


@dataclasses.dataclass
class Header:
    """What the first bytes of an encoded image say (tensors): its KINDS index, stored height and width,
    EXIF orientation (1-8; 1 where there is none) and why it is refused ("" when it is read)."""
    kind: tf.Tensor
    height: tf.Tensor
    width: tf.Tensor
    orientation: tf.Tensor
    problem: tf.Tensor

    @property
    def turned(self) -> tf.Tensor:
        """Orientations 5-8 show the stored image transposed: its height is the shown width."""
        return self.orientation >= 5

    @property
    def shown_shape(self) -> tf.Tensor:
        """[height, width] as shown, after the EXIF orientation."""
        return tf.where(self.turned, tf.stack([self.width, self.height]), tf.stack([self.height, self.width]))


# ---------------------------------------------------------------- bytes


def _bytes_at(data: tf.Tensor, offset, length: int) -> tf.Tensor:
    """`length` bytes of `data` from `offset` as int64 values, zeros past the end."""
    size = tf.strings.length(data)
    offset = tf.clip_by_value(tf.cast(offset, tf.int32), 0, size)
    raw = tf.io.decode_raw(tf.strings.substr(data, offset, length), tf.uint8)
    return tf.ensure_shape(tf.cast(tf.pad(raw, [[0, length - tf.size(raw)]]), tf.int64), [length])


def _number(values: tf.Tensor, big_endian) -> tf.Tensor:
    """An unsigned integer from its bytes (int64 values), in either byte order."""
    count = values.shape[0]
    little = tf.reduce_sum(values * tf.constant([256 ** i for i in range(count)], tf.int64))
    big = tf.reduce_sum(values * tf.constant([256 ** (count - 1 - i) for i in range(count)], tf.int64))
    return tf.where(big_endian, big, little)


def _le(head: tf.Tensor, start: int, count: int) -> tf.Tensor:
    return _number(head[start:start + count], False)


def _be(head: tf.Tensor, start: int, count: int) -> tf.Tensor:
    return _number(head[start:start + count], True)


def _starts(head: tf.Tensor, prefix: bytes, at: int = 0) -> tf.Tensor:
    return tf.reduce_all(tf.equal(head[at:at + len(prefix)], tf.constant(list(prefix), tf.int64)))


# ---------------------------------------------------------------- the header


def _jpeg_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation tag of a JPEG (1 where it has none): the first "Exif\\0\\0" APP1 segment among its
    first bytes, its TIFF header's byte order, then IFD0's entries for tag 0x0112."""
    head = tf.strings.substr(data, 0, tf.minimum(EXIF_SCAN_BYTES, tf.strings.length(data)))
    parts = tf.strings.split(head, sep=EXIF_MARK, maxsplit=1)
    mark = tf.strings.length(parts[0])
    tiff = mark + len(EXIF_MARK)
    before, order = _bytes_at(data, mark - 4, 2), _bytes_at(data, tiff, 8)
    is_app1 = tf.logical_and(tf.equal(before[0], 0xFF), tf.equal(before[1], 0xE1))
    motorola = _starts(order, b"MM\x00*")
    intel = _starts(order, b"II*\x00")
    ifd = tiff + tf.cast(_number(order[4:8], motorola), tf.int32)
    count = tf.minimum(_number(_bytes_at(data, ifd, 2), motorola), MAX_IFD_ENTRIES)
    entries = tf.reshape(_bytes_at(data, ifd + 2, 12 * MAX_IFD_ENTRIES), [MAX_IFD_ENTRIES, 12])
    weights_le = tf.constant([1, 256], tf.int64)
    weights = tf.where(motorola, tf.reverse(weights_le, [0]), weights_le)
    tags = tf.reduce_sum(entries[:, 0:2] * weights, axis=1)
    types = tf.reduce_sum(entries[:, 2:4] * weights, axis=1)
    values = tf.reduce_sum(entries[:, 8:10] * weights, axis=1)
    wanted = (tf.equal(tags, ORIENTATION_TAG) & tf.equal(types, 3)  # SHORT
              & (tf.range(MAX_IFD_ENTRIES, dtype=tf.int64) < count))
    value = tf.reduce_max(tf.where(wanted, values, tf.zeros_like(values)))  # one entry per tag
    found = (tf.size(parts) > 1) & is_app1 & (motorola | intel) & (value >= 1) & (value <= 8)
    return tf.where(found, value, tf.constant(1, tf.int64))


def _other_format(head: tf.Tensor) -> tf.Tensor:
    """What an unread file seems to be, for the message."""
    known = [(_starts(head, b"II*\x00") | _starts(head, b"MM\x00*"), "a TIFF image"),
             (_starts(head, b"ftyp", 4) & (_starts(head, b"heic", 8) | _starts(head, b"heix", 8)
                                           | _starts(head, b"mif1", 8) | _starts(head, b"hevc", 8)),
              "a HEIC/HEIF image"),
             (_starts(head, b"ftyp", 4) & (_starts(head, b"avif", 8) | _starts(head, b"avis", 8)), "an AVIF image"),
             (_starts(head, b"\x00\x00\x01\x00"), "an ICO icon"),
             (_starts(head, b"%PDF"), "a PDF document"),
             (_starts(head, b"<"), "text or SVG, not an image")]
    names = tf.constant([name for _, name in known] + ["not an image format that is read"])
    index = tf.argmax(tf.cast(tf.stack([condition for condition, _ in known] + [tf.constant(True)]), tf.int32))
    return names[index]


def inspect(data: tf.Tensor, max_pixels: int | None = None) -> Header:
    """The header of one encoded image (a tf.string scalar), read from its first bytes without decoding it.
    `problem` says why it is refused: an empty or unknown file, a variant TensorFlow decodes wrongly or not at
    all, or more than `max_pixels` pixels (None: no limit)."""
    size = tf.strings.length(data)
    head = _bytes_at(data, 0, HEADER_BYTES)
    is_jpeg = tf.io.is_jpeg(data)
    is_png = _starts(head, b"\x89PNG\r\n\x1a\n")
    is_gif = _starts(head, b"GIF87a") | _starts(head, b"GIF89a")
    is_bmp = _starts(head, b"BM")
    is_webp = _starts(head, b"RIFF") & _starts(head, b"WEBP", 8)
    kind = tf.argmax(tf.cast(tf.stack([tf.constant(False), is_jpeg, is_png, is_gif, is_bmp, is_webp]), tf.int32),
                     output_type=tf.int32)

    # JPEG: TensorFlow's own header reader (it fails on a file that is no JPEG past its first marker)
    jpeg_shape = tf.cond(is_jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
                         lambda: tf.zeros([2], tf.int64))
    # BMP: the DIB header's size says its layout (12: OS/2 core header, else BITMAPINFOHEADER and later)
    core = tf.equal(_le(head, 14, 4), 12)
    bmp_width = tf.where(core, _le(head, 18, 2), _le(head, 18, 4))
    bmp_height = tf.where(core, _le(head, 20, 2), _le(head, 22, 4))
    bmp_height = tf.where(bmp_height >= 2 ** 31, 2 ** 32 - bmp_height, bmp_height)  # negative: top-down rows
    bmp_bits = tf.where(core, _le(head, 24, 2), _le(head, 28, 2))
    # WebP: the first chunk says lossy (VP8), lossless (VP8L) or extended (VP8X: canvas size, animation flag)
    vp8l_bits = _le(head, 21, 4)
    extended = _starts(head, b"VP8X", 12)
    webp_width = tf.where(_starts(head, b"VP8 ", 12), _le(head, 26, 2) % 16384,
                          tf.where(extended, _le(head, 24, 3) + 1, vp8l_bits % 16384 + 1))
    webp_height = tf.where(_starts(head, b"VP8 ", 12), _le(head, 28, 2) % 16384,
                           tf.where(extended, _le(head, 27, 3) + 1, (vp8l_bits // 16384) % 16384 + 1))
    animated = extended & tf.not_equal(tf.bitwise.bitwise_and(head[20], 2), 0)
    # what each format's header must hold where its size is read: garbage after a right signature is no size
    whole = [tf.logical_not(is_png) | _starts(head, b"IHDR", 12),
             tf.logical_not(is_webp) | extended | (_starts(head, b"VP8 ", 12) & _starts(head, b"\x9d\x01\x2a", 23))
             | (_starts(head, b"VP8L", 12) & tf.equal(head[20], 0x2F)),
             tf.logical_not(is_bmp) | (_le(head, 14, 4) >= 12) & (_le(head, 14, 4) <= 124) & (size >= 26)]

    shapes = tf.stack([tf.zeros([2], tf.int64), jpeg_shape, tf.stack([_be(head, 20, 4), _be(head, 16, 4)]),
                       tf.stack([_le(head, 8, 2), _le(head, 6, 2)]), tf.stack([bmp_height, bmp_width]),
                       tf.stack([webp_height, webp_width])])
    height, width = shapes[kind][0], shapes[kind][1]
    orientation = tf.cond(is_jpeg, lambda: _jpeg_orientation(data), lambda: tf.constant(1, tf.int64))

    bits = tf.strings.as_string(bmp_bits)
    gray_palette = tf.cond(is_bmp & tf.equal(bmp_bits, 8), lambda: _gray_palette(data, head), lambda: tf.constant(True))
    pixels = height * width
    problems = [
        (tf.equal(size, 0), tf.constant(f"is empty (0 bytes); remove it or {CONVERT}")),
        (tf.equal(kind, 0), tf.strings.join(["is ", _other_format(head), f"; {CONVERT}"])),
        (tf.logical_not(tf.reduce_all(tf.stack(whole))),
         tf.strings.join(["has a damaged ", tf.constant([k.upper() for k in KINDS])[kind], " header; ", CONVERT])),
        (is_bmp & tf.logical_not(tf.equal(bmp_bits, 24) | tf.equal(bmp_bits, 32) | tf.equal(bmp_bits, 8)),
         tf.strings.join(["is a ", bits, f"-bit BMP, which TensorFlow does not decode; {CONVERT}"])),
        (is_bmp & tf.equal(bmp_bits, 8) & tf.logical_not(gray_palette),
         tf.constant("is an 8-bit BMP with a colour palette, which TensorFlow decodes as gray levels; " + CONVERT)),
        (is_webp & animated, tf.constant(f"is an animated WebP, which TensorFlow's decoder cannot read; {CONVERT}")),
        ((height < 1) | (width < 1), tf.constant(f"has no pixels in its header (a damaged file); {CONVERT}")),
    ]
    if max_pixels is not None:
        problems.append((pixels > max_pixels, tf.strings.join(
            ["has ", tf.strings.as_string(width), "x", tf.strings.as_string(height), " = ",
             tf.strings.as_string(pixels), f" pixels, above data.max_pixels ({max_pixels}); downscale it, or raise "
             f"data.max_pixels if the memory it takes to decode is there"])))
    conditions = tf.stack([condition for condition, _ in problems] + [tf.constant(True)])
    messages = tf.stack([message for _, message in problems] + [tf.constant("")])
    problem = messages[tf.argmax(tf.cast(conditions, tf.int32))]
    return Header(kind, height, width, orientation, problem)


def _gray_palette(data: tf.Tensor, head: tf.Tensor) -> tf.Tensor:
    """Whether an 8-bit BMP's colour table is the gray ramp (entry i = (i, i, i)), which TensorFlow's decoder
    assumes: it returns the palette indices as gray levels."""
    table = 14 + _le(head, 14, 4)
    used = _le(head, 46, 4)
    used = tf.where((used == 0) | (used > 256), tf.constant(256, tf.int64), used)
    entries = tf.reshape(_bytes_at(data, table, 4 * 256), [256, 4])[:, :3]
    ramp = tf.range(256, dtype=tf.int64)[:, None]
    matches = tf.reduce_all(tf.equal(entries, ramp), axis=1)
    return tf.reduce_all(matches | (tf.range(256, dtype=tf.int64) >= used))


def require_readable(header: Header, name: tf.Tensor | str) -> tf.Operation:
    """An op that fails, in one line naming the image, when its header says it is refused."""
    return checks.check(tf.equal(header.problem, ""), "image ", name, " ", header.problem)


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
    branches = [
        lambda: image,
        lambda: tf.reverse(image, [1]),  # 2: mirrored
        lambda: tf.reverse(image, [0, 1]),  # 3: upside down
        lambda: tf.reverse(image, [0]),  # 4: mirrored upside down
        lambda: tf.transpose(image, [1, 0, 2]),  # 5: transposed
        lambda: tf.reverse(tf.transpose(image, [1, 0, 2]), [1]),  # 6: turned 90 degrees clockwise
        lambda: tf.reverse(tf.transpose(image, [1, 0, 2]), [0, 1]),  # 7: transverse
        lambda: tf.reverse(tf.transpose(image, [1, 0, 2]), [0]),  # 8: turned 90 degrees counter-clockwise
    ]
    turned = tf.switch_case(tf.cast(orientation - 1, tf.int32), branches)
    turned.set_shape([None, None, image.shape[-1]])
    return turned


def stored_window(window: tuple, orientation: tf.Tensor, stored_shape: tf.Tensor) -> tf.Tensor:
    """A window [top, left, height, width] of the shown image as the window of the stored pixels that shows it."""
    top, left, height, width = (tf.cast(value, tf.int32) for value in window)
    rows, cols = tf.cast(stored_shape[0], tf.int32), tf.cast(stored_shape[1], tf.int32)
    candidates = tf.stack([
        [top, left, height, width],
        [top, cols - left - width, height, width],
        [rows - top - height, cols - left - width, height, width],
        [rows - top - height, left, height, width],
        [left, top, width, height],
        [rows - left - width, top, width, height],
        [rows - left - width, cols - top - height, width, height],
        [left, cols - top - height, width, height],
    ])
    return candidates[tf.cast(orientation - 1, tf.int32)]


def decode(data: tf.Tensor, channels: int, max_pixels: int | None = None, name: tf.Tensor | str = "") -> tf.Tensor:
    """One encoded image as uint8 pixels (height, width, channels) as it is shown: the first frame, its EXIF
    orientation applied; refused in one line naming it (`name`) when its header says so."""
    header = inspect(data, max_pixels)
    with tf.control_dependencies([require_readable(header, name)]):
        image = tf.io.decode_image(data, channels=0, expand_animations=False)
    image = orient(to_channels(image, channels), header.orientation)
    image.set_shape([None, None, channels])
    return image


def decode_window(data: tf.Tensor, window: tuple, channels: int, max_pixels: int | None = None,
                  name: tf.Tensor | str = "", header: Header | None = None) -> tf.Tensor:
    """Only the window [top, left, height, width] of the shown image: a JPEG decodes just the stored blocks
    that hold it (`decode_and_crop_jpeg`, the main saving of the ImageNet input pipeline); other formats decode
    whole, then crop. `header`: the image's, when the caller has read it already."""
    header = header if header is not None else inspect(data, max_pixels)
    stored = stored_window(window, header.orientation, tf.stack([header.height, header.width]))

    def jpeg():
        return tf.image.decode_and_crop_jpeg(data, stored, channels=0)

    def other():
        image = tf.io.decode_image(data, channels=0, expand_animations=False)
        return tf.slice(image, tf.stack([stored[0], stored[1], 0]), tf.stack([stored[2], stored[3], -1]))

    with tf.control_dependencies([require_readable(header, name)]):
        image = tf.cond(tf.equal(header.kind, KINDS.index("jpeg")), jpeg, other)
    image = orient(to_channels(image, channels), header.orientation)
    image.set_shape([None, None, channels])
    return image


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
    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
    def run(data):
        header = inspect(data, max_pixels)
        shown = header.shown_shape
        return header.kind, shown[0], shown[1], header.orientation, header.problem
    return run


@functools.cache
def _verify_fn():
    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
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
