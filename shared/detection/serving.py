"""What a detection SavedModel serves, and what a run's Detector and TFLite file take in the same way: the
image preprocessing an export records, the evaluation view of one encoded image (`eval_pixels`) and the two
serving endpoints (`detection_serving_functions`: decode, resize, normalize, detect, per-class NMS).
"""

from __future__ import annotations


def preprocessing(config) -> dict:
    """How the exports take an image: its size, channels and normalization (detection.json, export.json)."""
    from shared.detection.datasets import detection_normalization

    mean, std = detection_normalization(config)
    data = config.data
    return {"image_size": data.image_size, "channels": data.channels, "preprocessing": "resize",
            "normalize": data.normalize, "mean": mean, "std": std}


def detection_serving_functions(detector, config, class_names: list[str]):
    """(bytes_fn, images_fn): the two endpoints as plain functions of batched tensors."""
    import tensorflow as tf

    from shared.data import preprocess
    from shared.detection.model import model_anchors
    from shared.detection.postprocess import decode_detections

    data = config.data
    size, channels = data.image_size, data.channels
    prep = preprocessing(config)
    normalize = preprocess.normalizer(prep["mean"], prep["std"], data.normalize, size)
    anchors = model_anchors(detector, config.detection)
    names = tf.constant([*class_names, ""], tf.string)  # index -1 (padding) picks ""

    def detect(pixels, image_shapes):
        """pixels [N, S, S, C] 0-255; image_shapes [N, 2] (height, width) the boxes are scaled to."""
        found = decode_detections(anchors, detector(normalize(pixels), training=False), config.detection, size)
        shapes = tf.cast(image_shapes, tf.float32)
        scale = tf.stack([shapes[:, 1], shapes[:, 0], shapes[:, 1], shapes[:, 0]], axis=-1) / float(size)
        classes = found["classes"]
        return {"boxes": found["boxes"] * scale[:, None, :], "classes": classes,
                "labels": tf.gather(names, tf.where(classes >= 0, classes, len(class_names))),
                "scores": found["scores"], "num_detections": found["num_detections"]}

    def bytes_fn(image_bytes):
        pixels, shapes = tf.map_fn(lambda encoded: eval_pixels(encoded, size, channels, data.max_pixels), image_bytes,
                                   fn_output_signature=(tf.TensorSpec((size, size, channels), tf.float32),
                                                        tf.TensorSpec((2,), tf.int32)))
        return detect(pixels, shapes)

    def images_fn(images):
        shapes = tf.fill([tf.shape(images)[0], 2], size)
        return detect(images, shapes)

    return bytes_fn, images_fn


def eval_pixels(encoded, size: int, channels: int, max_pixels: int | None = None, name="an input image"):
    """One encoded image as make_dataset's evaluation view has it: decoded as shown, resized to S x S (always;
    the same bilinear kernel), float 0-255; and its own (height, width) as shown, which boxes are scaled back
    to. Refused in one line naming it (`name`) as the formats table says (`shared.data.formats`)."""
    import tensorflow as tf

    from shared.data import preprocess

    image = tf.cast(preprocess.decode(encoded, channels, max_pixels, name), tf.float32)
    shape = tf.shape(image)[:2]
    return tf.ensure_shape(tf.image.resize(image, [size, size]), (size, size, channels)), shape
