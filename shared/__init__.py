"""Keras-native training of the canonical ILSVRC classifiers, with every run snapshotted.

The flow is one way: config -> data -> model -> fit -> run snapshot. Each concept has one module:
`config`, `data`, `modelzoo`, `optim`, `train`, `evaluate`, `runs`, and the CLI in `runner`.
"""

import os

__version__ = "0.1.0"

# Host memory through TF's BFC allocator, not malloc: the input pipeline makes a fresh ~600 KB float image
# per example, and from malloc each one is new pages (mmap, page faults, zeroing); that cost a third of the
# ImageNet train pipeline's throughput here (scripts/bench_input.py, 2-core CPU: 1101 -> 1412 images/s).
# TF reads it when it starts, so it is set here, before any module of the package imports TensorFlow;
# a value already in the environment wins.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
