"""Distillation on Fashion-MNIST: the same small student, trained alone and distilled from a stronger
teacher run, with the same budget (epochs, batches, optimizer) and the same seeds, side by side.

    python scripts/bench_distill.py --teacher runs/alexnet/v0002 [--student models/resnet/quick.yaml]
        [--set model.width=4 --set train.epochs=2] [--seeds 0 1]

Prints each seed's test top-1 for both, the means, and as its last line
`student alone=X.XXXX distilled=Y.YYYY gain_points=Z.ZZ`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.config import load_config  # noqa: E402
from shared.lifecycle import train  # noqa: E402

STUDENT_DEFAULTS = ["model.width=4", "train.epochs=2", "train.verbose=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a finished Fashion-MNIST run")
    parser.add_argument("--student", default="models/resnet/quick.yaml", help="the student's recipe")
    parser.add_argument("--set", action="append", default=[], help="student overrides (after the defaults)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs-dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="bench-distill-")
    alone, distilled = [], []
    for seed in args.seeds:
        common = [*STUDENT_DEFAULTS, *args.set, f"train.seed={seed}", f"run.dir={runs_dir}"]
        plain = train(load_config(args.student, [*common, "run.notes=bench_distill: student alone"]))
        taught = train(load_config(args.student, [*common, f"distill.teacher={args.teacher}",
                                                  "run.notes=bench_distill: distilled student"]))
        alone.append(plain.test_metrics()["top1"])
        distilled.append(taught.test_metrics()["top1"])
        print(f"seed {seed}: alone {alone[-1]:.4f} ({plain.path})  distilled {distilled[-1]:.4f} ({taught.path})",
              flush=True)
    mean_alone, mean_distilled = statistics.mean(alone), statistics.mean(distilled)
    print(f"teacher {args.teacher}; student {args.student} with {' '.join([*STUDENT_DEFAULTS, *args.set])}; "
          f"seeds {args.seeds}")
    print(f"student alone={mean_alone:.4f} distilled={mean_distilled:.4f} "
          f"gain_points={(mean_distilled - mean_alone) * 100:.2f}")


if __name__ == "__main__":
    main()
