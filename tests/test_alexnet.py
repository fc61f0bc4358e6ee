"""AlexNet (models/alexnet): parameter counts, LRN, PCA lighting, backbone, small images, one fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared import modelzoo
from shared.callbacks import built_before_fit
from shared.config import load_config
from shared.data import augment as shared_augment
from shared.errors import UserError
from shared.modelzoo import MODELS_DIR, load_model_module

alexnet = load_model_module(MODELS_DIR / "alexnet")
alexnet_augment = modelzoo.import_file(MODELS_DIR / "alexnet" / "augment.py", "_test_alexnet_augment")


def trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def test_default_matches_torchvision_parameter_count():
    model = alexnet.build()
    assert trainable(model) == model.count_params() == 61_100_840
    assert model.output.shape[1:] == (1000,)
    assert model.layers[-1].name == "predictions"


def test_two_towers_has_the_papers_grouped_parameter_count():
    # conv 34,944 + 307,456 + 885,120 + 663,936 + 442,624; fc 37,752,832 + 16,781,312 + 4,097,000.
    model = alexnet.build(two_towers=True, lrn=True)
    assert trainable(model) == 60_965_224
    assert model.get_layer("conv2").groups == 2 and model.get_layer("conv3").groups == 1


def lrn_reference(a, size=5, k=2.0, alpha=1e-4, beta=0.75):
    """Sec. 3.3 written out: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta."""
    channels, half = a.shape[-1], size // 2
    b = np.empty_like(a, dtype=np.float64)
    for i in range(channels):
        lo, hi = max(0, i - half), min(channels - 1, i + half)
        b[..., i] = a[..., i] / (k + alpha * np.sum(a[..., lo:hi + 1].astype(np.float64) ** 2, axis=-1)) ** beta
    return b


def test_lrn_layer_follows_the_papers_formula():
    a = (np.random.default_rng(0).normal(size=(2, 3, 4, 11)) * 60).astype("float32")  # alpha*sum ~ k
    layer = alexnet.LocalResponseNormalization()
    out = np.asarray(layer(a))
    np.testing.assert_allclose(out, lrn_reference(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, tf.nn.local_response_normalization(a, 2, bias=2.0, alpha=1e-4, beta=0.75),
                               rtol=1e-5, atol=1e-5)
    # groups=2: the window stays inside each half (each GPU in the paper).
    b = a[..., :10]
    grouped = np.asarray(alexnet.LocalResponseNormalization(groups=2)(b))
    np.testing.assert_allclose(grouped, np.concatenate([lrn_reference(b[..., :5]), lrn_reference(b[..., 5:])], -1),
                               rtol=1e-5, atol=1e-5)
    clone = alexnet.LocalResponseNormalization.from_config(layer.get_config())
    assert (clone.size, clone.k, clone.alpha, clone.beta) == (5, 2.0, 1e-4, 0.75)


def test_pca_lighting_keeps_shape_and_is_identity_at_zero():
    image = tf.random.uniform((8, 6, 3), 0, 255, seed=1)
    assert alexnet_augment.pca_lighting(std=0.0)(image) is image
    out = alexnet_augment.pca_lighting(std=0.1)(image)
    assert out.shape == image.shape and out.dtype == tf.float32
    shift = (out - image).numpy()
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0, 0], shift.shape), atol=1e-3)  # one RGB offset


def test_pca_lighting_draws_alpha_along_the_scaled_eigenvectors():
    tf.random.set_seed(0)
    lighting = alexnet_augment.pca_lighting(std=0.1)
    zero = tf.zeros((1, 1, 3))
    shifts = np.stack([lighting(zero).numpy()[0, 0] for _ in range(300)])
    eigvec, eigval = np.array(alexnet_augment.IMAGENET_EIGVEC), np.array(alexnet_augment.IMAGENET_EIGVAL) * 255
    alphas = np.linalg.solve(eigvec, shifts.T).T / eigval  # shift = eigvec @ (alpha * eigval * 255)
    assert np.all(np.abs(alphas.std(axis=0) - 0.1) < 0.02)
    with pytest.raises(UserError, match="pca_lighting needs RGB images, and data.channels is 1"):
        lighting(tf.zeros((4, 4, 1)))


def test_pca_lighting_takes_images_whose_channel_count_the_graph_does_not_know():
    """A decoder may leave the channel count to run time (shape [h, w, None]): RGB images go through."""
    lighting = tf.function(alexnet_augment.pca_lighting(std=0.1),
                           input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
    out = lighting(tf.fill((5, 4, 3), 100.0))
    assert out.shape == (5, 4, 3) and np.ptp(out.numpy().reshape(-1, 3), axis=0).max() < 1e-3
    assert lighting.get_concrete_function().structured_outputs.shape.as_list() == [None, None, 3]
    with pytest.raises(tf.errors.InvalidArgumentError):
        lighting(tf.zeros((4, 4, 1)))


def alexnet_on_a_folder(tmp_path, channels: int) -> list[str]:
    """models/alexnet/run.yaml (alexnet_crop, flip, pca_lighting) on a folder of tiny PNGs, grayscale
    and RGB mixed, at a small width."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(4):
            mode = "L" if i % 2 else "RGB"
            shape = (12, 10) if mode == "L" else (12, 10, 3)
            Image.fromarray(rng.integers(0, 255, shape, np.uint8), mode).save(tmp_path / "imgs" / label / f"{i}.png")
    return ["data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.name=null", "data.manual_dir=null",
            "data.test_split=test", "data.test_fraction=0.25", "data.image_size=16", f"data.channels={channels}",
            "model.width=0.05", "model.small_input=true", "train.epochs=1", "train.batch_size=4", "train.verbose=0",
            f"run.dir={tmp_path / 'runs'}"]


def test_run_yaml_trains_on_a_folder_of_tiny_images(tmp_path):
    from shared.data import make_datasets

    config = load_config(MODELS_DIR / "alexnet" / "run.yaml", alexnet_on_a_folder(tmp_path, 3))
    images, labels = next(iter(make_datasets(config, alexnet_augment).train))
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images.numpy()).all()


def test_pca_lighting_on_grayscale_is_one_line_before_a_run_folder(tmp_path, capsys):
    from shared import runner

    overrides = alexnet_on_a_folder(tmp_path, 1)
    code = runner.main(["--config", str(MODELS_DIR / "alexnet" / "run.yaml"), *(f"--set={o}" for o in overrides)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and lines == ["error: data.augment pca_lighting needs RGB images, and data.channels is 1; set "
                                   "data.channels: 3 or leave pca_lighting out"], err
    assert "Traceback" not in err and "in user code" not in err and not (tmp_path / "runs" / "alexnet").exists()


def test_pca_lighting_is_found_by_name_from_the_model_folder():
    (entry,) = shared_augment.build([{"pca_lighting": {"std": 0.1}}], 224, model_augment=alexnet_augment)
    assert entry.name == "pca_lighting" and entry.fn(tf.zeros((4, 4, 3))).shape == (4, 4, 3)


def test_backbone_outputs_by_stride():
    shapes = {k: tuple(t.shape[1:]) for k, t in alexnet.backbone().output.items()}
    assert shapes == {"stride_4": (55, 55, 64), "stride_8": (27, 27, 192), "stride_16": (13, 13, 256),
                      "stride_32": (6, 6, 256)}
    small = alexnet.backbone((28, 28, 1), lrn=True, two_towers=True, small_input=True)
    assert {k: tuple(t.shape[1:]) for k, t in small.output.items()} == {
        "stride_1": (28, 28, 96), "stride_2": (14, 14, 256), "stride_4": (7, 7, 256), "stride_8": (4, 4, 256)}


@pytest.mark.parametrize("two_towers", [False, True])
def test_small_input_at_28_px(two_towers):
    model = alexnet.build(10, (28, 28, 1), lrn=two_towers, two_towers=two_towers, small_input=True)
    assert model.get_layer("conv5").output.shape[1:3] == (7, 7)
    assert model.get_layer("avg_pool").output.shape[1:] == (4, 4, 256)
    images = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype("float32")
    probabilities = np.asarray(model(images, training=False))  # direct call: no predict() graph to trace
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_one_training_epoch_on_random_images():
    keras.utils.set_random_seed(0)
    # Single tower: Conv2D(groups=2) runs through XLA on CPU and makes a fit ~3x slower (forward is tested above).
    model = alexnet.build(10, (32, 32, 3), lrn=True, small_input=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy",
                  jit_compile=False)
    images = np.random.default_rng(0).uniform(-1, 1, (32, 32, 32, 3)).astype("float32")
    labels = np.arange(32) % 10
    before = [w.numpy().copy() for w in model.trainable_weights]
    assert built_before_fit(model, (images, labels))  # the optimizer's slots now: the step traced once, not twice
    history = model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


@pytest.mark.parametrize("recipe", ["run.yaml", "quick.yaml"])
def test_recipes_load_and_match_build(recipe):
    config = load_config(MODELS_DIR / "alexnet" / recipe)
    hparams = modelzoo.resolve_hparams(alexnet, config.model.hparams)
    assert config.model.name == "alexnet" and hparams["small_input"] == (recipe == "quick.yaml")
    shared_augment.build(config.data.augment, config.data.image_size, model_augment=alexnet_augment)


def test_the_papers_crop_is_a_random_patch_of_the_resized_central_square():
    """Krizhevsky et al. 2012: shorter side to 256, the central 256 x 256, a random 224 x 224 patch of it."""
    (entry,) = shared_augment.build(["alexnet_crop"], 224)
    assert entry.crops_raw_image and entry.fn.resize == 256
    rows, cols = np.mgrid[0:300, 0:400].astype(np.float32)
    image = tf.constant(np.stack([rows, cols, np.zeros_like(rows)], -1))  # each pixel holds its row and column
    for _ in range(5):
        patch = entry.fn(image).numpy()
        assert patch.shape == (224, 224, 3)
        # the central square is columns 50-349 of the 300 rows, scaled by 256 / 300: a patch lies inside it
        assert patch[..., 1].min() >= 50 - 1 and patch[..., 1].max() <= 349 + 1
    encoded = tf.io.encode_png(tf.cast(tf.minimum(image, 255), tf.uint8))
    assert entry.fn.from_encoded(encoded, 3).shape == (224, 224, 3)
    assert entry.fn.from_encoded(encoded, 3, dct_scaling=True).shape == (224, 224, 3)
    with pytest.raises(Exception, match="smaller than the crop"):
        shared_augment.build([{"alexnet_crop": {"resize": 200}}], 224)
