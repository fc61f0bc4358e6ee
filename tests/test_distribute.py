"""tf.distribute: mirrored over two logical CPU devices, and multi-worker with two local processes
(TF_CONFIG on 127.0.0.1); the global batch is the per-replica batch times the replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

import forked
from conftest import REPO, free_ports, tiny_tree
from shared.config_schema import DistributeConfig
from shared.errors import UserError

pytestmark = pytest.mark.slow  # every test trains across devices or worker processes


def test_mirrored_on_two_logical_cpus(tmp_path, one_conv_model):
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1, "batch_size": 16, "verbose": 0, "lr": {"base": 0.05}})
    tree["model"] = one_conv_model  # the strategy is what is checked, not the model
    tree["distribute"] = {"strategy": "mirrored"}
    script = textwrap.dedent(f"""
        from shared.distribute import split_cpu
        split_cpu(2)  # before TensorFlow sets up its devices
        from shared.config import load_config
        from shared.lifecycle import train
        run = train(load_config(tree={tree!r}))
        print("RESULT", run.path)
    """)
    result = forked.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy, 2 replicas" in result.stdout
    # 256 examples, global batch 16 x 2 = 32: 8 steps per epoch
    assert "8 steps x 1 epochs" in result.stdout
    run_dir = result.stdout.split("RESULT ")[1].strip()
    assert json.loads(open(f"{run_dir}/status.json").read())["status"] == "finished"


def test_multi_worker_with_two_local_processes(tmp_path, one_conv_model):
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 2, "batch_size": 16, "verbose": 0, "lr": {"base": 0.05}})
    tree["model"] = one_conv_model  # the strategy is what is checked, not the model
    tree["distribute"] = {"strategy": "multi_worker"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                      "task": {"type": "worker", "index": index}})}
        processes.append(forked.popen([sys.executable, "-m", "shared.runner", "--config", str(config)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=400) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert "MultiWorkerMirroredStrategy, 2 replicas, 2 workers" in outputs[0][0]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()  # only the chief keeps a run folder
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert (run_dir / "checkpoints" / "epoch-0002.keras").is_file()


def test_bad_cluster_settings(monkeypatch):
    from shared.distribute import make_placement

    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UserError, match="TF_CONFIG is not a valid cluster"):
        make_placement(DistributeConfig(strategy="multi_worker"))
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(UserError, match="fewer than two workers"):
        make_placement(DistributeConfig(strategy="multi_worker"))


def test_auto_is_the_default_strategy_on_one_device(monkeypatch):
    from shared.distribute import make_placement

    monkeypatch.delenv("TF_CONFIG", raising=False)
    placement = make_placement(DistributeConfig())
    assert placement.replicas == 1 and placement.is_chief


@pytest.mark.parametrize("ending", ["finishes", "fails"])
def test_a_non_chief_workers_scratch_run_is_removed_however_training_ends(tmp_path, monkeypatch, ending,
                                                                           one_conv_model):
    """A non-chief worker trains into a scratch run under the temporary folder; it goes when training ends,
    also when training fails (it was left behind then)."""
    import tempfile

    import keras
    import tensorflow as tf

    from shared import distribute
    from shared.config import load_config
    from shared.lifecycle import train

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setattr(distribute, "make_placement", lambda settings: distribute.Placement(
        tf.distribute.get_strategy(), 1, False, "a non-chief worker"))
    tree = tiny_tree(tmp_path / "runs", data={"synthetic_train": 32, "synthetic_test": 16},
                     train={"epochs": 1, "batch_size": 16, "verbose": 0, "lr": {"base": 0.05}})
    tree["model"] = one_conv_model
    scratch = []

    class WorkerLost(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            scratch.extend(temporary.glob("worker-run-*"))
            if ending == "fails":
                raise RuntimeError("worker lost")

    if ending == "fails":
        with pytest.raises(RuntimeError, match="worker lost"):
            train(load_config(tree=tree), callbacks=[WorkerLost()])
    else:
        train(load_config(tree=tree), callbacks=[WorkerLost()])
    assert len(scratch) == 1  # it did train in a scratch run
    assert list(temporary.glob("worker-run-*")) == [] and not (tmp_path / "runs").exists()
