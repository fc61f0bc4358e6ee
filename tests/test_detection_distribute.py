"""Detection under tf.distribute: the losses normalize by the global batch's positives across replicas, and a
tiny detection run trains at the global batch mirrored over two logical CPU devices and multi-worker with two
local processes (TF_CONFIG on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.fashion_mnist import FASHION_MNIST_DIRS
import forked
from conftest import free_ports, tiny_backbone
from test_detection_runner import SIZE, data_overrides, tiny_canvases

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.width=4", "detection.fpn_channels=8", "detection.head_depth=1", "train.epochs=1",
        f"data.image_size={SIZE}", "detection.score_threshold=0.0", "train.verbose=0"]


@pytest.fixture(scope="module")
def canvases(tmp_path_factory) -> Path:
    """The tiny canvas set, generated once for the runs of this file (read only)."""
    return tiny_canvases(tmp_path_factory.mktemp("canvases"))


def python(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = forked.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_losses_under_a_mirrored_strategy_equal_one_device_on_the_global_batch():
    # The two halves have different numbers of positive anchors (3 and 1): a mean of per-replica
    # sum / positives would differ from the global sum / positives.
    result = python("""
        from shared.distribute import split_cpu
        split_cpu(2)
        import numpy as np, tensorflow as tf
        from shared.detection.losses import BoxLoss, FocalLoss
        rng = np.random.default_rng(0)
        labels = np.full((4, 6), -1, np.int32); labels[0, :3] = [0, 1, 2]; labels[3, 2] = 1; labels[1, 5] = -2
        logits = rng.normal(size=(4, 6, 3)).astype(np.float32)
        boxes = np.concatenate([rng.normal(size=(4, 6, 4)), labels[..., None]], -1).astype(np.float32)
        deltas = rng.normal(size=(4, 6, 4)).astype(np.float32)
        cases = [(FocalLoss(), labels, logits), (BoxLoss(weight=2.0), boxes, deltas)]
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        for loss, y_true, y_pred in cases:
            one = float(loss(y_true, y_pred))
            halves = tf.data.Dataset.from_tensor_slices((y_true, y_pred)).batch(4)
            batch = next(iter(strategy.experimental_distribute_dataset(halves)))
            # each replica's loss (Keras scales it by 1 / replicas), summed as the gradients' all-reduce sums
            per_replica = strategy.run(loss, args=batch)
            both = float(strategy.reduce("SUM", per_replica, axis=None))
            print("LOSS", loss.name, one, both)
            assert abs(one - both) < 1e-5 * max(1.0, abs(one)), (loss.name, one, both)
    """)
    assert result.stdout.count("LOSS") == 2


@pytest.mark.slow
@pytest.mark.skipif(not (Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST IDX files not installed")
def test_mirrored_detection_run_on_two_logical_cpus(canvases, tmp_path):
    overrides = [*TINY, tiny_backbone(tmp_path), "train.batch_size=4", "distribute.strategy=mirrored",
                 f"run.dir={tmp_path / 'runs'}",
                 *data_overrides(canvases)]
    args = ["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
            *[arg for item in overrides for arg in ("--set", item)]]
    result = python(f"""
        from shared.distribute import split_cpu
        split_cpu(2)  # before TensorFlow sets up its devices
        from shared import runner
        raise SystemExit(runner.main({args!r}))
    """, timeout=600)
    assert "MirroredStrategy, 2 replicas" in result.stdout
    # 16 training images at the global batch 4 x 2 = 8: 2 steps per epoch
    assert "2 steps x 1 epochs" in result.stdout, result.stdout[-2000:]
    (run_dir,) = (tmp_path / "runs" / "tiny_backbone").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    for name in ("loss", "boxes_loss", "classes_loss"):
        if name in header:
            value = float(last[header.index(name)])
            assert value == value and abs(value) < float("inf"), (name, value)
    assert "loss" in header
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert 0.0 <= metrics["mAP50"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(not (Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST IDX files not installed")
def test_multi_worker_detection_run_with_two_local_processes(canvases, tmp_path):
    overrides = [*TINY, tiny_backbone(tmp_path), "train.batch_size=4", "train.epochs=2",
                 "distribute.strategy=multi_worker",
                 f"run.dir={tmp_path / 'runs'}", *data_overrides(canvases)]
    args = ["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
            *[arg for item in overrides for arg in ("--set", item)]]
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                      "task": {"type": "worker", "index": index}})}
        processes.append(forked.popen([sys.executable, "-m", "shared.runner", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert "MultiWorkerMirroredStrategy, 2 replicas, 2 workers" in outputs[0][0]
    assert "2 steps x 2 epochs" in outputs[0][0], outputs[0][0][-2000:]  # 16 images, global batch 4 x 2
    (run_dir,) = (tmp_path / "runs" / "tiny_backbone").iterdir()  # only the chief keeps a run folder
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert (run_dir / "checkpoints" / "epoch-0002.keras").is_file()
    assert 0.0 <= json.loads((run_dir / "test_metrics.json").read_text())["mAP50"] <= 1.0
