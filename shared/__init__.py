"""Keras-native training of the canonical ILSVRC classifiers, with every run snapshotted.

The flow is one way: config -> task -> data -> model -> fit -> run snapshot. Each concept has one home: the
generic layer at the top (`config`, `lifecycle`, `checkpoints`, `runs`, `export`, `predict`, the `loop` and
`tuning` packages, the commands in `commands` and `runner`, installed as `ilsvrc-canon` by `cli`) and one
package per task (`classification`, `detection`, `deblur`). docs/architecture.md maps them.
"""

import os
from importlib import metadata

try:  # one version, pyproject.toml's, as `ilsvrc-canon --version` reports it
    __version__ = metadata.version("ilsvrc-canon")
except metadata.PackageNotFoundError:  # sources used without installing them
    __version__ = "0+unknown"

# Host memory through TF's BFC allocator, not malloc: the input pipeline makes a fresh ~600 KB float image
# per example, and from malloc each one is new pages (mmap, page faults, zeroing); scripts/bench_input.py
# measures the difference (docs/configs-and-data.md, "Data sources").
# TF reads it when it starts, so it is set here, before any module of the package imports TensorFlow;
# a value already in the environment wins.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

# TensorFlow's C++ log (its start-up lines, "failed call to cuInit" on a CPU machine) off unless the environment
# sets TF_CPP_MIN_LOG_LEVEL (0 brings it back), also while TensorFlow loads: before it is imported, like the above.
from shared import tf_log  # noqa: E402

tf_log.quiet_by_default()
