"""Benchmark: `predict` throughput (images/s) on the Fashion-MNIST test set as PNG files, by the run (its Keras
model, files decoded in a tf.data pipeline) and by its SavedModel export (files decoded in the served graph),
at batch 1 and batched, in one process.

    python scripts/bench_predict.py --run runs/resnet/v0001 [--limit 10000] [--batch 256] [--out bench_predict.png]

The test images are written as PNG files into a temporary folder first (not timed), the run is exported into
another; each measurement classifies every file once after a short warm-up (tracing). It also checks that
the two agree on every image's top class. Prints a table and draws a bar chart (`--out`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.errors import UserError, run_cli  # noqa: E402

WARMUP = 8  # images classified before timing: traces the functions, fills the pipeline once


def write_pngs(folder: Path, limit: int) -> list[str]:
    """The first `limit` Fashion-MNIST test images as folder/00000.png, ... (grayscale 28 x 28)."""
    from PIL import Image

    from shared.fashion_mnist import FASHION_MNIST_DIRS, read_split

    images, _ = read_split(Path(FASHION_MNIST_DIRS[0]), "test")
    paths = []
    for i, image in enumerate(images[:limit]):
        paths.append(str(folder / f"{i:05d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def images_per_second(predictor, paths: list[str], batch: int) -> tuple[float, list[int]]:
    predictor.predict(paths[:WARMUP], top_k=1, batch_size=min(batch, WARMUP))
    start = time.perf_counter()
    result = predictor.predict(paths, top_k=1, batch_size=batch)
    elapsed = time.perf_counter() - start
    if any(p.error for p in result):
        raise UserError(f"{sum(bool(p.error) for p in result)} images were skipped; the benchmark needs them all")
    return len(paths) / elapsed, [p.ids[0] for p in result]


def bar_chart(rows: list[tuple[str, int, float]], title: str, out: Path) -> Path:
    from matplotlib.figure import Figure

    from shared.plots import save_figure

    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.add_subplot()
    batches = sorted({batch for _, batch, _ in rows})
    sources = list(dict.fromkeys(source for source, _, _ in rows))
    width = 0.8 / len(sources)
    for s, source in enumerate(sources):
        values = [next(rate for name, b, rate in rows if name == source and b == batch) for batch in batches]
        positions = [i + (s - (len(sources) - 1) / 2) * width for i in range(len(batches))]
        bars = axes.bar(positions, values, width, label=source)
        axes.bar_label(bars, fmt="%.0f", fontsize=8)
    axes.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    axes.set_ylabel("images / s")
    axes.set_title(title, fontsize=10)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained Fashion-MNIST run, e.g. runs/resnet/v0001")
    parser.add_argument("--limit", type=int, default=10000, help="test images used (default all 10,000)")
    parser.add_argument("--batch", type=int, default=256, help="the batched size (default 256)")
    parser.add_argument("--out", default="bench_predict.png", help="the bar chart (default bench_predict.png)")
    args = parser.parse_args(argv)

    def action() -> None:
        from shared.classification import export
        from shared.classification.predict import Predictor
        from shared.runs import open_run
        from shared.tasks import rebuild

        if args.limit < WARMUP:
            raise UserError(f"--limit must be at least {WARMUP} (got {args.limit})")
        run = open_run(args.run)
        if (run.config_dict().get("data") or {}).get("source") != "fashion_mnist":
            raise UserError(f"run {run.path} is not a Fashion-MNIST run (data.source: fashion_mnist)")
        with tempfile.TemporaryDirectory(prefix="bench-predict-") as scratch:
            scratch = Path(scratch)
            (scratch / "png").mkdir()
            paths = write_pngs(scratch / "png", args.limit)
            folder = export.export_saved_model(*rebuild(run), run, scratch / "exports")
            predictors = {"run (Keras)": Predictor.from_run(run, *rebuild(run)),
                          "SavedModel": Predictor.from_saved_model(folder)}
            rows, tops = [], {}
            for batch in (1, args.batch):
                for name, predictor in predictors.items():
                    rate, tops[name, batch] = images_per_second(predictor, paths, batch)
                    rows.append((name, batch, rate))
                    print(f"{name:<12} batch {batch:>4}: {rate:8.0f} images/s", flush=True)
        agree = sum(a == b for a, b in zip(tops["run (Keras)", args.batch], tops["SavedModel", args.batch]))
        print(f"\n{len(paths)} Fashion-MNIST test PNGs, run {run.path}, {os.cpu_count()} CPU cores")
        print(f"{'source':<12} {'batch':>5} {'images/s':>9}")
        for name, batch, rate in rows:
            print(f"{name:<12} {batch:>5} {rate:9.0f}")
        print(f"top-1 class identical for {agree} / {len(paths)} images")
        title = f"predict on {len(paths)} Fashion-MNIST PNGs ({os.cpu_count()} CPU cores)"
        print(f"chart: {bar_chart(rows, title, Path(args.out))}")

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
