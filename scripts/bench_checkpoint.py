"""Benchmark: a checkpoint's save and load with Keras' attribute skip sets kept once per kind of object
(`shared.keras_saving.install`, which `shared.modelzoo.build_model` does) against Keras' own lookup, which works
them out again for every object it walks.

Two models from models/resnet: the suite's tiny one (depth 18, width 4, 16 px) and ResNet-50 at 224 px, a user's
scale. For each, the two sides alternate in one process (`--rounds` pairs); a round saves the model to a `.keras`
file (what each epoch's checkpoint is) and loads its weights back as the runner does
(`shared.modelzoo.load_weight_file`: resuming, re-testing, exporting). Medians in
seconds; the weights loaded are checked equal to the saved ones on both sides.

    python scripts/bench_checkpoint.py [--rounds 5] [--skip-resnet50]

The last line printed is exactly `ratio kept/keras_own=X.XX` (ResNet-50's save + load; the tiny model's when
skipped).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shared  # noqa: E402,F401  (first: it sets the host allocator before TensorFlow starts)
import numpy as np  # noqa: E402
from keras.src.saving import saving_lib  # noqa: E402

from shared.modelzoo import MODELS_DIR, build_model, load_model_module, load_weight_file  # noqa: E402


def save_and_load(model, folder: Path) -> tuple[float, float]:
    path = folder / "checkpoint.keras"
    start = time.perf_counter()
    model.save(path)
    saved = time.perf_counter()
    weights = [np.array(w) for w in model.get_weights()]
    load_weight_file(model, path)
    loaded = time.perf_counter()
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    return saved - start, loaded - saved


def measure(name: str, model, rounds: int) -> float:
    kept = saving_lib.get_attr_skipset  # build_model installed it
    if not hasattr(kept, "__wrapped__"):
        sys.exit("this Keras finds the skip sets it stores, so shared.keras_saving left it alone: nothing to compare")
    functions = {"keras_own": kept.__wrapped__, "kept": kept}
    times = {side: [] for side in functions}
    with tempfile.TemporaryDirectory() as folder:
        save_and_load(model, Path(folder))  # the first save builds what both sides then share
        for _ in range(rounds):
            for side, function in functions.items():
                saving_lib.get_attr_skipset = function
                times[side].append(save_and_load(model, Path(folder)))
    saving_lib.get_attr_skipset = kept
    medians = {side: (statistics.median(save for save, _ in pairs), statistics.median(load for _, load in pairs))
               for side, pairs in times.items()}
    for side, (save, load) in medians.items():
        print(f"{name:28s} {side:9s} save {save:7.3f} s  load {load:7.3f} s")
    return sum(medians["kept"]) / sum(medians["keras_own"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-resnet50", action="store_true", help="only the tiny model (seconds)")
    args = parser.parse_args(argv)
    resnet = load_model_module(MODELS_DIR / "resnet")
    tiny = build_model(resnet, 4, (16, 16, 3), {"depth": 18, "width": 4, "small_input": True})
    tiny.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    ratio = measure("resnet-18 width 4, 16 px", tiny, args.rounds)
    print(f"ratio kept/keras_own (tiny)={ratio:.2f}")
    if not args.skip_resnet50:
        full = build_model(resnet, 1000, (224, 224, 3), {"depth": 50})
        full.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        ratio = measure("resnet-50, 224 px", full, args.rounds)
    print(f"ratio kept/keras_own={ratio:.2f}")


if __name__ == "__main__":
    main()
