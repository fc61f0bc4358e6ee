"""Keras-native training of the canonical ILSVRC classifiers, with every run snapshotted.

The flow is one way: config -> data -> model -> fit -> run snapshot. Each concept has one module:
`config`, `data`, `modelzoo`, `optim`, `train`, `evaluate`, `runs`, and the CLI in `runner`.
"""

__version__ = "0.1.0"
