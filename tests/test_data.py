import gzip
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared.config import load_config
from shared.config_schema import with_changes
from shared.data import augment, make_datasets, preprocess, sources
from shared.errors import UserError

from conftest import REPO, tiny_tree

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as out:
        out.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_dir(root: Path, train: int = 40, test: int = 20) -> Path:
    """The four IDX files in the real format, with random pixels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


def make_folder_dataset(root: Path, classes=("cat", "dog", "fox"), per_class=4, size=(40, 30)) -> Path:
    """ImageNet-style train/<class>/*.jpg and val/<class>/*, including a grayscale JPEG and a PNG."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 1:
                    image.convert("L").save(folder / f"{i}.jpg")
                elif i == 2:
                    image.save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.JPEG")
    return root


def config_for(tmp_path, **data):
    tree = tiny_tree(tmp_path / "runs")
    tree["data"] = {"image_size": 16, "channels": 3, **data}
    return load_config(tree=tree)


def first_batch(dataset):
    images, labels = next(iter(dataset))
    return images.numpy(), labels.numpy()


def test_fashion_mnist_reads_idx_files_from_data_path(tmp_path):
    config = config_for(tmp_path, source="fashion_mnist", path=str(fake_fashion_dir(tmp_path / "fm")),
                        image_size=28, channels=1)
    datasets = make_datasets(config)
    assert (datasets.num_train, datasets.num_test, datasets.num_classes) == (40, 20, 10)
    images, labels = first_batch(datasets.test)
    assert images.shape == (20, 28, 28, 1) and labels.tolist() == list(np.arange(20) % 10)


def test_fashion_mnist_grayscale_becomes_rgb_when_asked(tmp_path):
    config = config_for(tmp_path, source="fashion_mnist", path=str(fake_fashion_dir(tmp_path / "fm")),
                        image_size=32, channels=3, normalize=False)
    images, _ = first_batch(make_datasets(config).test)
    assert images.shape[1:] == (32, 32, 3)
    np.testing.assert_allclose(images[..., 0], images[..., 2])  # the same gray in every channel


def test_fashion_mnist_missing_everywhere_says_where_and_how(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def no_network(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "builder", no_network)
    config = config_for(tmp_path, source="fashion_mnist", path=str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"Fashion-MNIST not found.*empty.*apt-get install dataset-fashion-mnist"):
        make_datasets(config)


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    folder = fake_fashion_dir(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a readable IDX file"):
        make_datasets(config_for(tmp_path, source="fashion_mnist", path=str(folder)))


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files_from_the_debian_package(tmp_path):
    datasets = make_datasets(config_for(tmp_path, source="fashion_mnist", image_size=28, channels=1,
                                        normalize=False))
    assert (datasets.num_train, datasets.num_test) == (60000, 10000)
    images, labels = first_batch(datasets.test)
    assert 0.0 <= images.min() and images.max() <= 1.0 and set(labels.tolist()) <= set(range(10))


def test_synthetic_is_deterministic():
    a = sources.synthetic_arrays(32, 5, 8, 3, seed=1)
    b = sources.synthetic_arrays(32, 5, 8, 3, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_folder_source_decodes_jpeg_png_and_grayscale(tmp_path):
    root = make_folder_dataset(tmp_path / "imgs")
    config = config_for(tmp_path, source="folder", path=str(root), test_split="val")
    datasets = make_datasets(config)
    assert datasets.class_names == ["cat", "dog", "fox"]
    assert (datasets.num_train, datasets.num_test) == (12, 12)
    images, labels = first_batch(datasets.test)
    assert images.shape == (12, 16, 16, 3)
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_pipelines_of_one_setting_trace_the_eval_decoder_once(tmp_path):
    from shared.data import preprocess

    root = make_folder_dataset(tmp_path / "imgs")
    config = config_for(tmp_path, source="folder", path=str(root), test_split="val", image_size=17)  # a size no
    # other test of this worker builds, so the count starts here
    first = make_datasets(config)
    view = preprocess.encoded_eval_view(17, config.data.crop_fraction, 3, config.data.max_pixels,
                                        bool(config.data.dct_scaling))
    traced = view.experimental_get_tracing_count()
    assert traced == 1
    second = make_datasets(config)  # as the loop's next round builds its pipelines again
    assert view.experimental_get_tracing_count() == traced
    np.testing.assert_array_equal(first_batch(first.test)[0], first_batch(second.test)[0])
    assert first_batch(first.test)[0].shape == (12, 17, 17, 3)


def test_folder_source_errors(tmp_path):
    with pytest.raises(UserError, match="folder dataset not found"):
        make_datasets(config_for(tmp_path, source="folder", path=str(tmp_path / "missing")))
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "noval" / "train" / "a" / "x.jpg")
    with pytest.raises(UserError, match="no val/ folder"):
        make_datasets(config_for(tmp_path, source="folder", path=str(tmp_path / "noval"), test_split="val"))


def test_tfds_source_on_tfds_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(sources, "unreachable", lambda url: None)  # the mock downloads nothing: no network needed
    with tfds.testing.mock_data(num_examples=12):
        config = config_for(tmp_path, source="tfds", name="mnist", image_size=28, channels=1)
        datasets = make_datasets(config)
        assert datasets.num_classes == 10
        images, labels = first_batch(datasets.test)
        assert images.shape[1:] == (28, 28, 1)


def test_imagenet_without_its_tars_says_where_to_put_them(tmp_path):
    config = config_for(tmp_path, source="tfds", name="imagenet2012", data_dir=str(tmp_path / "tfds"),
                        manual_dir=str(tmp_path / "manual"), test_split="validation")
    with pytest.raises(UserError, match=r"ILSVRC2012_img_train\.tar.*data\.manual_dir \(now .*manual\)"):
        make_datasets(config)


def test_tfds_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
        make_datasets(config_for(tmp_path, source="tfds", name="no_such_dataset_xyz"))


def test_normalization_toggles(tmp_path):
    on = config_for(tmp_path, source="synthetic", num_classes=3, normalize=True)
    off = config_for(tmp_path, source="synthetic", num_classes=3, normalize=False)
    normalized, _ = first_batch(make_datasets(on).test)
    raw, _ = first_batch(make_datasets(off).test)
    assert 0.0 <= raw.min() and raw.max() <= 1.0
    np.testing.assert_allclose(normalized, (raw * 255.0 - 127.5) / 36.0, rtol=1e-4, atol=1e-4)


def test_center_crop_keeps_the_middle():
    image = tf.reshape(tf.range(40 * 20 * 1, dtype=tf.float32), (40, 20, 1))
    out = preprocess.center_crop(image, 16, crop_fraction=1.0)
    assert out.shape == (16, 16, 1)


def test_augmentations_compose_from_names_and_keras_layers():
    built = augment.build(["horizontal_flip", {"random_crop": {"padding": 2}},
                           {"RandomContrast": {"factor": 0.2}}], image_size=8)
    image = tf.random.uniform((8, 8, 3), 0, 255)
    for augmentation in built:
        image = augmentation.fn(image)
    assert image.shape == (8, 8, 3)


def test_random_resized_crop_must_come_first_and_outputs_image_size():
    (crop,) = augment.build(["random_resized_crop"], image_size=12)
    assert crop.crops_raw_image and crop.fn(tf.zeros((50, 30, 3))).shape == (12, 12, 3)
    with pytest.raises(UserError, match="must be the first entry"):
        augment.build(["horizontal_flip", "random_resized_crop"], image_size=12)


def test_augmentation_errors_suggest_fixes():
    with pytest.raises(UserError, match="unknown augmentation 'horizontal_flp'.*did you mean horizontal_flip"):
        augment.build(["horizontal_flp"], image_size=8)
    with pytest.raises(UserError, match="random_crop takes no argument 'pad'.*did you mean padding"):
        augment.build([{"random_crop": {"pad": 2}}], image_size=8)


def test_model_folder_augment_py_is_used(tmp_path, model_copy):
    (model_copy / "augment.py").write_text(
        "import tensorflow as tf\n\ndef invert():\n    return lambda image: 255.0 - image\n")
    from shared.modelzoo import import_file
    module = import_file(model_copy / "augment.py", "_test_augment")
    (invert,) = augment.build(["invert"], image_size=4, model_augment=module)
    assert float(invert.fn(tf.zeros((4, 4, 1)))[0, 0, 0]) == 255.0


def test_a_model_folder_augmentation_with_python_control_flow_on_tensors_runs_in_the_pipeline(tmp_path, model_copy):
    # the pipeline's own functions are traced without autograph; a user's `if` on a tensor still needs it
    (model_copy / "augment.py").write_text(
        "import tensorflow as tf\n\n\ndef invert_dark():\n    def fn(image):\n"
        "        if tf.reduce_mean(image) < 128.0:\n            image = 255.0 - image\n        return image\n"
        "    return fn\n")
    for split in ("train", "test"):
        for name, value in (("dark", 0), ("light", 255)):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), value).save(tmp_path / "images" / split / name / f"{i}.png")
    config = load_config(tree=tiny_tree(
        tmp_path / "runs", model={"path": str(model_copy)},
        data={"source": "folder", "path": str(tmp_path / "images"), "image_size": 8, "channels": 1,
              "num_classes": None, "augment": ["invert_dark"], "normalize": False, "shuffle_buffer": 1}))
    from shared.modelzoo import load_augment_module
    images, _ = next(iter(make_datasets(config, model_augment=load_augment_module(model_copy)).train))
    assert np.all(images.numpy() == 1.0)  # 255 scaled to 1: the dark ones inverted, the light kept


def encoded(tmp_path, fmt: str, size=(48, 36), mode="RGB") -> tf.Tensor:
    pixels = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / f"image.{fmt}"
    Image.fromarray(pixels).convert(mode).save(path, format="JPEG" if fmt == "jpg" else "PNG", quality=95)
    return tf.io.read_file(str(path))


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_fused_center_crop_equals_decode_then_crop(tmp_path, fmt):
    data = encoded(tmp_path, fmt)
    fused = preprocess.decode_center_crop(data, 16, 0.875, 3)
    whole = preprocess.decode(data, 3)
    top, left, height, width = preprocess.center_crop_window(tf.shape(whole), 0.875)
    assert (int(height), int(width)) == (31, 31)  # 0.875 of the 36 px short side, centred
    reference = tf.image.resize(whole[top:top + height, left:left + width], [16, 16])
    np.testing.assert_allclose(fused.numpy(), reference.numpy(), atol=1e-3)


@pytest.mark.parametrize("fmt, mode", [("jpg", "RGB"), ("jpg", "L"), ("png", "RGB")])
def test_fused_random_resized_crop_on_encoded_images(tmp_path, fmt, mode):
    (crop,) = augment.build(["random_resized_crop"], image_size=12)
    out = crop.fn.from_encoded(encoded(tmp_path, fmt, mode=mode), 3)
    assert out.shape == (12, 12, 3) and 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0


def test_folder_training_pipeline_uses_the_fused_crop(tmp_path):
    root = make_folder_dataset(tmp_path / "imgs")
    config = config_for(tmp_path, source="folder", path=str(root), test_split="val",
                        augment=["random_resized_crop", "horizontal_flip"])
    images, _ = first_batch(make_datasets(config).train)
    assert images.shape[1:] == (16, 16, 3)


def test_mixup_and_cutmix_mix_whole_batches_into_soft_labels(tmp_path):
    config = config_for(tmp_path, source="synthetic", num_classes=4, batch_augment=[{"MixUp": {"alpha": 0.4}},
                                                                                   "CutMix"])
    datasets = make_datasets(config)
    assert datasets.soft_labels
    images, labels = first_batch(datasets.train)
    assert labels.shape == (images.shape[0], 4)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert (labels.max(axis=1) < 1.0).any()  # some labels really are mixtures
    assert first_batch(datasets.test)[1].ndim == 1  # the test split keeps class indices
    with pytest.raises(UserError, match="unknown batch augmentation 'Mixup'.*did you mean MixUp"):
        make_datasets(config_for(tmp_path, source="synthetic", batch_augment=["Mixup"]))


def test_keras_randaugment_and_random_erasing_by_name(tmp_path):
    config = config_for(tmp_path, source="synthetic", num_classes=3, augment=["RandAugment", "RandomErasing"])
    images, _ = first_batch(make_datasets(config).train)
    assert images.shape[1:] == (16, 16, 3) and np.isfinite(images).all()


def _two_batches(tmp_path, seed: int):
    import keras
    keras.utils.set_random_seed(seed)
    root = tmp_path / "imgs"
    if not root.exists():
        make_folder_dataset(root)
    tree = {"data": {"source": "folder", "path": str(root), "test_split": "val", "image_size": 16,
                     "deterministic": True, "augment": ["random_resized_crop", "horizontal_flip",
                                                        {"RandomContrast": {"factor": 0.3}}]},
            "train": {"batch_size": 5, "seed": seed}}
    iterator = iter(make_datasets(load_config(tree=tree)).train)
    return [next(iterator)[0].numpy() for _ in range(2)]


@pytest.mark.slow
def test_deterministic_pipeline_repeats_exactly_under_a_seed(tmp_path):
    first, again, other = _two_batches(tmp_path, 3), _two_batches(tmp_path, 3), _two_batches(tmp_path, 4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_each_worker_reads_its_own_shard(tmp_path):
    config = config_for(tmp_path, source="synthetic", num_classes=4, synthetic_train=10, normalize=False)
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        datasets = make_datasets(config, input_context=context)
        assert datasets.num_train == 5
        images, _ = next(iter(datasets.train.unbatch().batch(5)))
        seen.append({image.tobytes() for image in images.numpy()})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10  # disjoint halves of the 10 examples


def test_importing_the_package_selects_the_bfc_host_allocator_unless_told_otherwise():
    """TF reads TF_CPU_ALLOCATOR_USE_BFC once at start-up: `import shared` must set it (and respect a user's value)."""
    import os
    import subprocess
    import sys

    probe = "import shared, os; print(os.environ['TF_CPU_ALLOCATOR_USE_BFC'])"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    default = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=REPO)
    chosen = subprocess.run([sys.executable, "-c", probe], env={**env, "TF_CPU_ALLOCATOR_USE_BFC": "false"},
                            capture_output=True, text=True, cwd=REPO)
    assert default.stdout.strip() == "true", default.stderr
    assert chosen.stdout.strip() == "false", chosen.stderr


def test_a_resumed_stream_starts_where_the_epochs_done_left_it(tmp_path):
    """start_epoch=2 (a run resumed after two epochs) yields the batches an uninterrupted stream yields
    from its third epoch on; 100 examples in batches of 32: an epoch is 4 batches, across pass ends."""
    config = with_changes(config_for(tmp_path, source="synthetic", num_classes=4, synthetic_train=100,
                                     synthetic_test=20), {"train.batch_size": 32})

    def batches(start_epoch: int, count: int) -> list:
        stream = make_datasets(config, start_epoch=start_epoch).train
        return [(images.numpy(), labels.numpy()) for images, labels in stream.take(count)]

    uninterrupted, resumed = batches(0, 12), batches(2, 4)
    assert make_datasets(config).steps_per_epoch == 4
    for (images, labels), (want_images, want_labels) in zip(resumed, uninterrupted[8:]):
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_allclose(images, want_images)
    assert not np.array_equal(resumed[0][1], uninterrupted[0][1])  # not the first epoch again


def test_skip_log_names_each_failed_image_once_first_and_last_included():
    """data.on_corrupt: skip: the images a pipeline drops are named once however many passes read them, the
    first and the last of a split too (a pass's end shows its tail); a stream that never ends (training)
    counts nothing still in flight."""
    from shared.data import SkipLog, _skipping

    @tf.autograph.experimental.do_not_convert
    def fails_on_0_4_9(image, label):
        bad = tf.reduce_any(tf.equal(image, [0, 4, 9]))
        with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(bad), [image])]):
            return tf.cast(image, tf.float32), label

    names = [f"image-{i}.png" for i in range(10)]
    pairs = tf.data.Dataset.from_tensor_slices((tf.range(10), tf.range(10)))
    evaluation = SkipLog(names, finite=True)
    dataset = _skipping(pairs, fails_on_0_4_9, evaluation, tf.data.AUTOTUNE, identified=False)
    for _ in range(3):  # three epochs of validation
        assert [int(image) for image, _ in dataset] == [1, 2, 3, 5, 6, 7, 8]
    assert evaluation.skipped() == ["image-0.png", "image-4.png", "image-9.png"] and evaluation.seen

    training = SkipLog(names)
    stream = _skipping(pairs.enumerate().map(lambda i, pair: (i, *pair)).repeat(), fails_on_0_4_9, training, 1)
    assert len(list(stream.take(15))) == 15  # two passes and a bit: 0, 4 and 9 left out each time
    assert training.skipped() == ["image-0.png", "image-4.png", "image-9.png"]
    assert not SkipLog(names).seen  # never read: a re-test reports no training images
