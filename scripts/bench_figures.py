"""Benchmark: seconds to draw and write each figure a run draws at its end (`shared.plots`: curves, confusion,
errors, image grid; the detection gallery; the loop's rounds.png; a study's history and Pareto plots), from
made-up inputs of a typical size, as the median of `--repeat` drawings in one process.

    python scripts/bench_figures.py [--repeat 7] [--only errors_gray,curves] [--keep /tmp/figures]

The inputs: a metrics.csv of 5 epochs (loss, top1, top5, lr, val_*), a 10-class confusion matrix with the
Fashion-MNIST names, 16 mistakes of 32 x 32 x 1 (normalized, with mean and std, named `test #N`) and 16 of
32 x 32 x 3 (long ILSVRC file names), a preview grid of 32 images, a detection gallery of 16 images of 64 x 64,
6 loop rounds and a study of 12 trials. The first drawing of each figure is not timed (font cache, imports).
`--keep` leaves the PNGs there to look at. To compare two versions of the code side by side, run it with
`PYTHONPATH` naming the other tree's root (its `shared` is imported before this tree's):

    git worktree add --detach /tmp/figs-before HEAD
    PYTHONPATH=/tmp/figs-before python scripts/bench_figures.py --keep /tmp/before
    python scripts/bench_figures.py --keep /tmp/after

Prints one line per figure: the median and the fastest seconds, and the PNG's size in pixels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.append(str(Path(__file__).resolve().parent.parent))  # appended: a PYTHONPATH tree's `shared` wins

import numpy as np  # noqa: E402

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
METRICS_CSV = "epoch,loss,lr,top1,top5,val_loss,val_top1,val_top5\n" + "".join(
    f"{e},{2.0 / (e + 1):.4f},{0.1 * 0.5 ** e:.5f},{0.3 + 0.1 * e:.3f},{0.7 + 0.05 * e:.3f},"
    f"{2.1 / (e + 1):.4f},{0.28 + 0.1 * e:.3f},{0.68 + 0.05 * e:.3f}\n" for e in range(5))


def mistakes(rng: np.random.Generator, channels: int) -> dict:
    """16 confident mistakes as the classification task hands them to plot_errors."""
    count = 16
    true = rng.integers(0, 10, count)
    predicted = (true + rng.integers(1, 10, count)) % 10
    return {"images": rng.normal(0, 1, (count, 32, 32, channels)).astype(np.float32),
            "true_names": [FASHION[i] for i in true], "predicted_names": [FASHION[i] for i in predicted],
            "scores": np.sort(rng.uniform(0.5, 1.0, count))[::-1].tolist()}


def detection_gallery(rng: np.random.Generator) -> dict:
    """16 images of 64 x 64 x 3 (0-255) with 2 true boxes and 4 predictions each."""
    images = rng.uniform(0, 255, (16, 64, 64, 3)).astype(np.float32)

    def boxes(count: int) -> np.ndarray:
        corner = rng.uniform(0, 40, (count, 2))
        return np.concatenate([corner, corner + rng.uniform(8, 24, (count, 2))], axis=1)

    truth = [(boxes(2), rng.integers(0, 3, 2)) for _ in images]
    detections = [(boxes(4), rng.integers(0, 3, 4), rng.uniform(0.2, 1.0, 4)) for _ in images]
    return {"images": images, "detections": detections, "truth": truth}


def study(objectives: int):
    """An in-memory optuna study of 12 complete trials (one or two objectives)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize", "minimize"][:objectives]
    made = optuna.create_study(study_name=f"bench{objectives}", directions=directions)
    rng = np.random.default_rng(objectives)
    for _ in range(12):
        trial = made.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        values = [float(rng.uniform(0.5, 0.9)), float(rng.uniform(1, 10))][:objectives]
        made.tell(trial, values if objectives > 1 else values[0])
    return made


def figures(folder: Path) -> dict[str, Callable[[Path], Path | None]]:
    """{name: draw(out_png)} for every figure benchmarked."""
    from shared import plots

    rng = np.random.default_rng(0)
    metrics_csv = folder / "metrics.csv"
    metrics_csv.write_text(METRICS_CSV)
    confusion = np.diag(rng.integers(60, 100, 10)) + rng.integers(0, 8, (10, 10))
    gray, rgb = mistakes(rng, 1), mistakes(rng, 3)
    long_names = [f"n0{1440764 + i}_ILSVRC2012_val_000{10000 + 37 * i}.JPEG" for i in range(16)]
    preview = rng.normal(0, 1.5, (32, 32, 32, 3)).astype(np.float32)
    preview_titles = [f"{FASHION[i % 10]} {0.5 + i / 64:.2f}" for i in range(32)]
    drawn = {
        "curves": lambda out: plots.plot_curves(metrics_csv, out),
        "confusion": lambda out: plots.plot_confusion(confusion, FASHION, out),
        "errors_gray": lambda out: plots.plot_errors(**gray, out_png=out, mean=[72.9], std=[90.0],
                                                     sources=[f"test #{17 * i}" for i in range(16)]),
        "errors_rgb": lambda out: plots.plot_errors(**rgb, out_png=out, sources=long_names),
        "image_grid": lambda out: plots.image_grid(preview, preview_titles, out),
    }
    try:
        from shared.detection.gallery import plot_detections
    except ImportError as error:  # the detection extras are part of the core install; say so if not
        print(f"detections: skipped ({error})", file=sys.stderr)
    else:
        gallery = detection_gallery(rng)
        drawn["detections"] = lambda out: plot_detections(gallery, ["car", "person", "dog"], out)
    from shared.loop.report import plot_rounds

    rounds = [{"round": r, "metric": 0.6 + 0.03 * r, "examples": 200 * r,
               "exported_version": r if r % 2 else None} for r in range(6)]
    drawn["loop_rounds"] = lambda out: plot_rounds(rounds, out, "top1")
    try:
        from shared.tuning.metrics import Objective
        from shared.tuning.report import plot_study
    except ImportError as error:
        print(f"study plots: skipped ({error})", file=sys.stderr)
    else:
        single, pair = study(1), study(2)
        top1, latency = Objective("top1", "maximize"), Objective("latency_ms", "minimize")
        drawn["study_history"] = lambda out: plot_study(single, [top1], out)
        drawn["study_pareto"] = lambda out: plot_study(pair, [top1, latency], out)
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed drawings of each figure (the median is given)")
    parser.add_argument("--only", default="", help="comma-separated figure names (default: all)")
    parser.add_argument("--keep", type=Path, help="a folder to leave the PNGs in")
    args = parser.parse_args()

    import shared

    print(f"shared from {Path(shared.__file__).resolve().parent}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        drawn = figures(Path(scratch))
        wanted = [name for name in args.only.split(",") if name] or list(drawn)
        if unknown := sorted(set(wanted) - set(drawn)):
            parser.error(f"no figure {', '.join(unknown)}; the figures: {', '.join(drawn)}")
        from PIL import Image

        print(f"{'figure':<14} {'median s':>9} {'min s':>7}  png", flush=True)
        for name in wanted:
            out = folder / f"{name}.png"
            drawn[name](out)  # not timed: first use of fonts, colormaps, lazy imports
            seconds = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                drawn[name](out)
                seconds.append(time.perf_counter() - start)
            with Image.open(out) as image:
                size = f"{image.size[0]}x{image.size[1]}"
            print(f"{name:<14} {statistics.median(seconds):9.4f} {min(seconds):7.4f}  {size}", flush=True)


if __name__ == "__main__":
    main()
