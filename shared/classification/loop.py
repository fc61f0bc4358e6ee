"""Classification in the loop (`shared.loop`): an accepted line says its image's class (`"label": "cat"`, a
class of the --from run), examples become shards in TF Model Garden's layout (`shared.data.tfrecord`, the
`tfrecord` source), the held-out set is loop.eval's or the recipe's own test split, and `train.class_weight:
auto` weighs the classes by the loop's own count of its current examples."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import tensorflow as tf

from shared.annotations import SHOWN_PROBLEMS, AnswerSchema, AnswerTable, Example, Malformed, class_index, \
    image_facts
from shared.data import class_weights, sources
from shared.data.tfrecord import image_example, read_image_file, shard_name
from shared.errors import UserError
from shared.loop import folder as loop_folder
from shared.loop.folder import DATA, EVAL, EVAL_PREFIX, TRAIN_PREFIX, Loop
from shared.loop.support import LoopSupport


@dataclasses.dataclass
class LabeledExample(Example):
    """An accepted classification task: its image and its class."""
    label: int  # index into the class names

    def counted_class(self) -> int:
        return self.label


class ClassLabel(AnswerSchema):
    """`"label": "cat"`: a class name of the model."""
    example_type = LabeledExample

    def says(self, item: dict, width: int, height: int, index: dict[str, int]) -> dict:
        return {"label": class_index(item.get("label"), index, "label")}


class ClassificationLoop(LoopSupport):
    answers = ClassLabel()

    def classes_without_run(self, loop: Loop) -> list[str]:
        raise UserError(f"--from {loop.from_run} is not a classification run with labels.txt; start the loop from "
                        f"a classification run of the classes to annotate")

    def write_records(self, folder: Path, prefix: str, examples: list[Example], class_names: list[str]) -> None:
        with tf.io.TFRecordWriter(str(folder / shard_name(prefix, 0, 1))) as writer:
            for example in examples:
                writer.write(image_example(example.image, example.image_format, example.height, example.width,
                                           example.label, class_names[example.label]).SerializeToString())

    def write_test_split(self, loop: Loop, class_names: list[str], folder: Path) -> None:
        """The recipe's test split as shards (decoded arrays encoded as PNG; files and encoded images as they
        are), its classes matched to the loop's by name. An image that does not decode is one line naming it,
        or (data.on_corrupt: skip) left out and named."""
        data = loop.config.data
        source = sources.load(data)
        position = {name: i for i, name in enumerate(class_names)}
        missing = [name for name in source.class_names if name not in position]
        if missing:
            raise UserError(f"the recipe's test split has class {missing[0]!r}, which the loop's model (--from) does "
                            f"not know; set loop.eval to a held-out annotations file")
        test = source.test.take(data.limit_test) if data.limit_test else source.test
        skipped = []
        with tf.io.TFRecordWriter(str(folder / shard_name(EVAL_PREFIX, 0, 1))) as writer:
            for number, (image, label) in enumerate(test.as_numpy_iterator(), start=1):
                name = source.class_names[int(label)]
                shown = os.fsdecode(image) if source.encoding == "path" else f"test image {number}"
                try:
                    if source.encoding == "path":
                        encoded, fmt, height, width = read_image_file(shown, data.max_pixels)
                    elif source.encoding == "bytes":
                        encoded = bytes(image)
                        fmt, width, height = image_facts(encoded, shown, data.max_pixels)
                    else:
                        pixels = image if image.ndim == 3 else image[..., None]
                        encoded, fmt, (height, width) = tf.io.encode_png(pixels).numpy(), "png", pixels.shape[:2]
                except (UserError, Malformed) as why:
                    if data.on_corrupt != "skip":
                        raise UserError(f"the loop's held-out set (the recipe's test split): {why}; or set "
                                        f"data.on_corrupt: skip") from None
                    skipped.append(shown)
                    continue
                writer.write(image_example(encoded, fmt, height, width, position[name], name).SerializeToString())
        if skipped:
            more = " ..." if len(skipped) > SHOWN_PROBLEMS else ""
            print(f"held-out set: left out {len(skipped)} test image(s) that do not decode (data.on_corrupt: skip): "
                  f"{', '.join(skipped[:SHOWN_PROBLEMS])}{more}", flush=True)

    def ingested_facts(self, table: AnswerTable, class_names: list[str]) -> dict:
        return {"class_counts": table.class_counts(len(class_names))}  # train.class_weight: auto weighs by them

    def data_changes(self, loop: Loop, train: str) -> dict:
        return {"data.source": "tfrecord", "data.path": str(loop.dir), "data.label_offset": 0,
                "data.train_split": train, "data.test_split": f"{EVAL}/{EVAL_PREFIX}", "data.val_fraction": 0.0,
                "data.test_fraction": 0.0}

    def oversample_changes(self, sets: list[str], times: int) -> dict:
        return {"data.oversample": {f"{DATA}/{name}/{TRAIN_PREFIX}-*": times for name in sets}}

    def round_changes(self, loop: Loop, state: dict, epochs: int) -> dict:
        """`train.class_weight: auto` counted from the loop's current examples (the tfrecord source lists no
        labels), recorded class by class."""
        if loop.config.train.class_weight != class_weights.AUTO:
            return {}
        names = loop_folder.class_names(loop.dir)
        return {"train.class_weight": class_weights.as_config(class_weights.auto(state["class_counts"]), names)}
