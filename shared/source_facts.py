"""The facts about each data source (`data.source`), in one table that every place reads: the config's
choices and checks, the loader `shared.data.sources.load` calls, the export's preprocessing, the test
split's class count. Free of TensorFlow, so the config loads without it."""

from __future__ import annotations

from dataclasses import dataclass

# What a source's images are, and so how the eval view is made (shared.data._image_fn):
ARRAYS = "arrays"  # decoded arrays of one square size: resized whole
FILES = "files"  # image files of any size, read by path: decoded fused with the center crop
ENCODED = "encoded"  # encoded images (bytes) of any size: likewise center-cropped
AS_STORED = "as stored"  # whichever the dataset holds (TFDS: fixed-size arrays, or encoded bytes)


@dataclass(frozen=True)
class SourceFacts:
    loader: str  # the function of shared.data.sources that loads it
    images: str  # ARRAYS, FILES, ENCODED or AS_STORED
    required: str | None = None  # the data key it cannot do without ("path", "name")
    required_hint: str = ""  # how to set it, for the error when it is empty
    classes_from_config: bool = False  # has as many classes as data.num_classes asks (not its own)

    @property
    def fixed_size(self) -> bool | None:
        """Whether the images are resized whole (True) or center-cropped (False); None: the dataset says."""
        return {ARRAYS: True, FILES: False, ENCODED: False}.get(self.images)


_FOLDER_HINT = "set it to the folder holding train/ and val/"

SOURCES: dict[str, SourceFacts] = {
    # the IDX files, else the Debian package's folder, else TFDS (fixed-size arrays either way)
    "fashion_mnist": SourceFacts("fashion_mnist", ARRAYS),
    "synthetic": SourceFacts("synthetic", ARRAYS, classes_from_config=True),
    "folder": SourceFacts("folder", FILES, required="path",
                          required_hint="set it to a folder of class folders (PATH/<class>/<image>), or of "
                                        "train/ and test/ folders of class folders"),
    "ilsvrc": SourceFacts("ilsvrc_source", FILES, required="path", required_hint=_FOLDER_HINT),
    "tfrecord": SourceFacts("tfrecord_source", ENCODED, required="path", required_hint=_FOLDER_HINT),
    "tfds": SourceFacts("tfds_source", AS_STORED, required="name", required_hint="set data.name (e.g. imagenet2012)"),
}
