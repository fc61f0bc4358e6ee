"""Benchmark: float32 against full-integer (int8) TFLite export of a Fashion-MNIST run.

In one process: convert the run's model to float32 and to int8 TFLite (int8 with float I/O and with
int8 I/O; the faster of the two is the one compared), then print each file's size, its LiteRT batch-1
median latency on one CPU thread (all models timed in interleaved rounds, so a load change on a busy
machine hits each alike), its top-1 on the full test split, and the int8/float32 ratios.

    python scripts/bench_export.py [--run runs/resnet/v0001] [--rounds 10] [--runs 50]

Without --run it first trains a small run itself (models/resnet/quick.yaml, 1 epoch on 12,800 images,
no XLA) in a temporary runs folder. Goals: size ratio <= 0.28, latency ratio <= 0.7, accuracy drop
<= 1 point. The last line printed is exactly
`ratio size=X.XX latency=Y.YY acc_drop_points=Z.ZZ` (int8 / float32 for size and latency;
acc_drop_points = (float32 top-1 - int8 top-1) * 100).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared import tflite  # noqa: E402
from shared.classification import tflite as classification_tflite  # noqa: E402
from shared.errors import run_cli  # noqa: E402
from shared.runs import Run, open_run  # noqa: E402
from shared.tasks import rebuild  # noqa: E402

QUICK = Path(__file__).resolve().parent.parent / "models" / "resnet" / "quick.yaml"
GOALS = {"size": 0.28, "latency": 0.7, "acc_drop_points": 1.0}


def train_small_run(runs_dir: Path) -> Run:
    """A quick Fashion-MNIST ResNet (the README's recipe, cut to one short epoch)."""
    from shared.config import load_config
    from shared.lifecycle import train

    config = load_config(QUICK, ["train.epochs=1", "data.limit_train=12800", "train.jit_compile=false",
                                 "train.verbose=0", f"run.dir={runs_dir}"])
    return train(config, argv=["scripts/bench_export.py"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained Fashion-MNIST run (default: train a small one)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds (default 10)")
    parser.add_argument("--runs", type=int, default=50, help="invokes per model per round (default 50)")
    args = parser.parse_args(argv)
    return run_cli(lambda: bench(args))


def bench(args: argparse.Namespace) -> None:
    run = open_run(args.run) if args.run else train_small_run(Path(tempfile.mkdtemp(prefix="bench-export-")))
    print(f"run {run.path}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    model, config = rebuild(run)
    paths = {
        "float32": classification_tflite.convert(model, config, run, "none"),
        "int8 (float I/O)": classification_tflite.convert(model, config, run, "int8", io="float"),
        "int8 (int8 I/O)": classification_tflite.convert(model, config, run, "int8", io="int8"),
    }
    latencies = dict(zip(paths, tflite.interleaved_latency_ms(list(paths.values()), rounds=args.rounds,
                                                              runs=args.runs)))
    int8 = min(("int8 (float I/O)", "int8 (int8 I/O)"), key=latencies.__getitem__)
    accuracy = {name: classification_tflite.evaluate_tflite(paths[name], run, config) for name in ("float32", int8)}

    keras_top1 = (run.test_metrics() or {}).get("top1")
    if keras_top1 is not None:
        print(f"keras top-1 (test_metrics.json): {keras_top1:.4f}")
    for name, path in paths.items():
        top1 = f"{accuracy[name]['top1']:.4f} on {accuracy[name]['examples']} test images" \
            if name in accuracy else "(not evaluated: the slower int8 variant)"
        print(f"{name:17s} {path.stat().st_size / 1e6:7.3f} MB  {latencies[name]:7.3f} ms  top-1 {top1}  {path}")
    print(f"int8 compared: {int8}, the faster of the two int8 variants on this machine "
          f"(LiteRT, 1 thread, batch 1, median of {args.rounds} x {args.runs} interleaved invokes)")
    size = paths[int8].stat().st_size / paths["float32"].stat().st_size
    latency = latencies[int8] / latencies["float32"]
    drop = (accuracy["float32"]["top1"] - accuracy[int8]["top1"]) * 100
    met = [f"{name} {'met' if value <= GOALS[name] else 'MISSED'} (goal <= {GOALS[name]})"
           for name, value in (("size", size), ("latency", latency), ("acc_drop_points", drop))]
    print("goals: " + ", ".join(met))
    print(f"ratio size={size:.2f} latency={latency:.2f} acc_drop_points={drop:.2f}")


if __name__ == "__main__":
    sys.exit(main())
