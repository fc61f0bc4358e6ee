"""Shared fixtures: tiny configs on synthetic data, and one trained run reused by many tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from shared.modelzoo import MODELS_DIR

REPO = Path(__file__).resolve().parent.parent


def tiny_tree(runs_dir: Path, **sections) -> dict:
    """A config tree for a very small ResNet on synthetic 16 px images: seconds per run."""
    tree = {
        "model": {"name": "resnet", "depth": 18, "width": 4, "small_input": True},
        "data": {"source": "synthetic", "image_size": 16, "channels": 3, "num_classes": 4,
                 "synthetic_train": 256, "synthetic_test": 64},
        "train": {"epochs": 2, "batch_size": 32, "verbose": 0, "lr": {"base": 0.05}},
        "run": {"dir": str(runs_dir), "notes": "a tiny test run"},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A private copy of models/resnet, free to edit."""
    target = tmp_path / "resnet_copy"
    shutil.copytree(MODELS_DIR / "resnet", target)
    return target


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished tiny run (from a private copy of the model source), shared by read-only tests."""
    from shared.config import load_config
    from shared.lifecycle import train

    base = tmp_path_factory.mktemp("trained")
    source = base / "resnet_src"
    shutil.copytree(MODELS_DIR / "resnet", source)
    tree = tiny_tree(base / "runs")
    tree["model"]["path"] = str(source)
    run = train(load_config(tree=tree), argv=["pytest"])
    return run, source
