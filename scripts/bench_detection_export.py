"""Benchmark: float32 against full-integer (int8) detection TFLite of one detection run.

In one process: export the run's detector to float32 and to int8 TFLite (the default form, ending in
TFLite_Detection_PostProcess; int8 calibrated on training images) into a temporary folder (the run's own
export/ only with --into-run), then print a table of each file's size, its LiteRT batch-1 CPU latency
(median of --repeats invokes per model after warm-up, the models timed in interleaved rounds so a load change
on a busy machine hits each alike, on --threads threads, on the run's first test image) and its mAP@.5 and
mAP@[.5:.95] on the run's test split through LiteRT (`evaluate_detection_tflite`), and the int8/float32 ratios.

    python scripts/bench_detection_export.py --run runs/resnet/v0002 [--threads 1] [--repeats 200]

The last line printed is exactly `ratio size=X.XX latency=Y.YY map50_drop_points=Z.ZZ`
(int8 / float32 for size and latency; map50_drop_points = (float32 mAP@.5 - int8 mAP@.5) * 100).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.errors import UserError, run_cli  # noqa: E402

QUANTIZE = {"float32": "none", "int8": "int8"}
WARMUP = 10
ROUNDS = 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained detection run folder")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT threads for the latency (default 1)")
    parser.add_argument("--repeats", type=int, default=200,
                        help="timed invokes per model, after warm-up (default 200)")
    parser.add_argument("--into-run", action="store_true",
                        help="write the files into the run's export/ instead of a temporary folder")
    args = parser.parse_args(argv)
    return run_cli(lambda: bench(args))


def table(rows: dict[str, dict], threads: int, repeats: int) -> list[str]:
    """The printed lines: one per model (size, latency, mAPs), then int8/float32 ratios and the mAP@.5 drop."""
    lines = [f"{'model':8s} {'bytes':>10s} {'MB':>6s} {'latency ms':>10s} {'mAP@.5':>7s} {'mAP@[.5:.95]':>12s}"]
    for name, row in rows.items():
        lines.append(f"{name:8s} {row['bytes']:10d} {row['bytes'] / 1e6:6.2f} {row['latency_ms']:10.2f} "
                     f"{row['map50']:7.4f} {row['map']:12.4f}")
    float32, int8 = rows["float32"], rows["int8"]
    size = int8["bytes"] / float32["bytes"]
    latency = int8["latency_ms"] / float32["latency_ms"]
    drop = (float32["map50"] - int8["map50"]) * 100
    lines.append(f"LiteRT batch 1, CPU, {threads} thread(s), median of {repeats} invokes per model "
                 f"({ROUNDS} interleaved rounds after {WARMUP} warm-up)")
    lines.append(f"ratio size={size:.2f} latency={latency:.2f} map50_drop_points={drop:.2f}")
    return lines


def interleaved_latency_ms(paths: list[Path], image, threads: int, repeats: int) -> list[float]:
    """Median batch-1 invoke time of each file on `image`, in alternating rounds (A, B, A, B...)."""
    from shared.detection.tflite_inference import tflite_interpreter

    interpreters = [tflite_interpreter(path, num_threads=threads) for path in paths]
    for interpreter in interpreters:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
        for _ in range(WARMUP):
            interpreter.invoke()
    samples: list[list[float]] = [[] for _ in paths]
    per_round = [repeats // ROUNDS + (i < repeats % ROUNDS) for i in range(ROUNDS)]
    for runs in per_round:
        for interpreter, collected in zip(interpreters, samples):
            for _ in range(runs):
                start = time.perf_counter()
                interpreter.invoke()
                collected.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(collected) for collected in samples]


def first_test_image(run, config):
    """The run's first test image as the detector is fed it: [1, S, S, C] float32, normalized."""
    import numpy as np

    from shared.detection import datasets as detection_data

    _, test, _ = detection_data.load_detection_data(config)
    for images, _ in detection_data.make_dataset(test.limit(1), config, training=False):
        return images.numpy()[:1].astype(np.float32)
    raise UserError(f"the test split of {run.path} is empty; check its data settings")


def bench(args: argparse.Namespace) -> None:
    from shared.detection.tflite import evaluate_detection_tflite, export_detection_tflite
    from shared.runs import open_run
    from shared.tasks import rebuild

    if args.threads < 1 or args.repeats < 1:
        raise UserError("--threads and --repeats must be at least 1")
    run = open_run(args.run)
    if run.config_dict().get("task") != "detection":
        raise UserError(f"{run.path} is not a detection run; pass a run trained from a detection config")
    folder = None if args.into_run else Path(tempfile.mkdtemp(prefix="bench-detection-export-"))
    print(f"run {run.path}; files in {folder or run.path / 'export'}; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    detector, config = rebuild(run)  # once, for both files
    paths = {name: export_detection_tflite(detector, config, run, quantize, out_path=None if folder is None
                                           else folder / f"detector_{quantize}.tflite")
             for name, quantize in QUANTIZE.items()}
    latencies = interleaved_latency_ms(list(paths.values()), first_test_image(run, config), args.threads,
                                       args.repeats)
    rows = {}
    for (name, path), latency in zip(paths.items(), latencies):
        metrics = evaluate_detection_tflite(path, config)
        rows[name] = {"bytes": path.stat().st_size, "latency_ms": latency,
                      "map50": metrics["mAP50"], "map": metrics["mAP"], "examples": metrics["examples"]}
    keras = run.test_metrics() or {}
    if "mAP50" in keras:
        print(f"run's own test (Keras): mAP@.5 {keras['mAP50']:.4f}, mAP@[.5:.95] {keras['mAP']:.4f}")
    print(f"mAP through LiteRT on {rows['float32']['examples']} test images")
    print("\n".join(table(rows, args.threads, args.repeats)))


if __name__ == "__main__":
    sys.exit(main())
