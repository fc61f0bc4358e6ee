"""tf.distribute strategies from `distribute:` in the config.

    auto          several GPUs: MirroredStrategy; a multi-worker TF_CONFIG: MultiWorkerMirroredStrategy;
                  otherwise TF's default (one device)
    one_device    the first GPU, else the CPU
    mirrored      synchronous data parallelism over every local GPU (every logical CPU when there is none)
    multi_worker  MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG environment variable
    tpu           TPUStrategy on distribute.tpu ("" on a TPU VM)

`train.batch_size` is per replica: the global batch is batch_size x replicas, and the learning rate's
linear scaling (train.lr.base_batch_size) uses the global batch. Keras shards the input per worker.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import tensorflow as tf

from shared.config_schema import DistributeConfig
from shared.errors import UserError


# Keras minor versions whose private trainer functions patch_multi_worker_build was tested against.
TESTED_KERAS = ("3.15",)


@dataclass
class Placement:
    strategy: tf.distribute.Strategy
    replicas: int
    is_chief: bool  # the worker that writes the run folder; the others write to scratch folders
    description: str


def cluster_spec() -> dict | None:
    """The parsed TF_CONFIG, or None; a malformed one is the user's to fix."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        spec = json.loads(text)
        spec["cluster"], spec["task"]["type"], spec["task"]["index"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"TF_CONFIG is not a valid cluster description ({error}); it needs "
                        f'{{"cluster": {{"worker": [...]}}, "task": {{"type": "worker", "index": 0}}}}') from None
    return spec


def _is_chief(spec: dict | None) -> bool:
    """Worker 0 is the chief unless the cluster names a separate chief task."""
    if not spec:
        return True
    task = spec["task"]
    if "chief" in spec["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and int(task["index"]) == 0


def _workers(spec: dict | None) -> int:
    return sum(len(spec["cluster"].get(kind, [])) for kind in ("chief", "worker")) if spec else 1


def make_placement(settings: DistributeConfig) -> Placement:
    """Create the configured strategy. Call it before any other TensorFlow work: the multi-worker
    and TPU runtimes must be set up first."""
    name = settings.strategy
    spec = cluster_spec()
    gpus = tf.config.list_physical_devices("GPU")  # physical: listing logical devices starts the runtime
    if name == "auto":
        name = "multi_worker" if _workers(spec) > 1 else "mirrored" if len(gpus) > 1 else "default"
    if name == "multi_worker":
        if _workers(spec) < 2:
            raise UserError("distribute.strategy is multi_worker but TF_CONFIG names fewer than two workers; "
                            "set TF_CONFIG on every worker (see docs/runs.md, Distributed training)")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "tpu":
        strategy = _tpu_strategy(settings.tpu)
    elif name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
            [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    else:
        strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    kind = {"multi_worker": "MultiWorkerMirroredStrategy", "mirrored": "MirroredStrategy", "tpu": "TPUStrategy",
            "one_device": "OneDeviceStrategy"}.get(name, "default strategy")
    where = f", {_workers(spec)} workers" if name == "multi_worker" else ""
    return Placement(strategy, replicas, _is_chief(spec) if name == "multi_worker" else True,
                     f"{kind}, {replicas} replica{'s' if replicas > 1 else ''}{where}")


def _tpu_strategy(address: str) -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as error:
        raise UserError(f"no TPU found at {address or 'this machine'!r} ({str(error).splitlines()[0][:200]}); "
                        f"set distribute.tpu to the TPU name or grpc:// address") from None
    return tf.distribute.TPUStrategy(resolver)


def split_cpu(count: int) -> None:
    """Expose the CPU as `count` logical devices, so mirrored training can be tried without GPUs.
    Must run before TensorFlow initializes its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def patch_multi_worker_build(model, placement: Placement) -> None:
    """Keras 3 (up to 3.15 at least) cannot start `fit` under MultiWorkerMirroredStrategy: before
    training it averages the first distributed batch across workers with `strategy.reduce` only to
    learn the input shapes, and that eager reduce fails on a PerReplica value
    (keras-team/keras#20585). The shapes are the same on every replica, so this model takes them from
    the local replica's batch instead. Other strategies are left as Keras handles them."""
    if not isinstance(placement.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    import types

    import keras

    check_patchable_keras(keras.__version__)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = keras.tree.map_structure(
                    lambda x: self.distribute_strategy.experimental_local_results(x)[0]
                    if isinstance(x, tf.distribute.DistributedValues) else x, batch)
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)
    # The same bug again after each step: Keras averages the scalar logs with
    # strategy.reduce("MEAN", v, axis=0), which fails on scalars. Taken as local values instead, the
    # logs are this worker's; the training itself (gradients all-reduced by the strategy) is unchanged.
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    keras_tf_trainer._collective_all_reduce_multi_worker = lambda strategy: False


def check_patchable_keras(version: str) -> None:
    """The multi-worker patch replaces private Keras functions: refuse a Keras it was not tested on rather
    than train with a patch that no longer fits."""
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_KERAS:
        raise UserError(f"multi-worker training patches Keras internals tested on Keras {', '.join(TESTED_KERAS)} "
                        f"only, and Keras {version} is installed; install a tested one "
                        f"(pip install 'keras=={TESTED_KERAS[-1]}.*') or use another distribute.strategy")
