"""scripts/bench_train.py measures the main job's recipe on both sides (its bare side once fed a recipe that smooths
labels the sparse labels its loss cannot take)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, load_script

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_the_bare_side_trains_the_main_jobs_recipe(tmp_path):
    bench = load_script("bench_train")
    recipe = bench.bench_config(str(REPO / "models/resnet/quick.yaml"), 256, 2, str(tmp_path))
    assert recipe.train.label_smoothing > 0  # the case that needs one-hot labels
    assert bench.bare_side(str(REPO / "models/resnet/quick.yaml"), 256, 2, str(tmp_path)) > 0
