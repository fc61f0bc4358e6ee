"""Benchmark: the deblurring figures of issue 15 on one recipe. Trains a deblurring run (default
models/resnet/deblur.yaml: Fashion-MNIST, Gaussian blur sigma 1-2) through the run lifecycle, then tests it
with a classification run (`test --run RUN --classifier CLASSIFIER`, shared.deblur.task.evaluate_with_classifier)
and prints the figures and whether the targets hold: restored PSNR at least 3 dB above the blurred input,
and at least half of the classifier's top-1 lost to blur recovered.

    python scripts/bench_deblur.py --classifier runs/resnet/v0001
    python scripts/bench_deblur.py --classifier runs/resnet/v0001 --config models/mobilenet_v2/deblur.yaml \\
        --set train.epochs=2
    python scripts/bench_deblur.py --classifier runs/resnet/v0001 --run runs/resnet/v0002  # test only

The classifier is a finished classification run of the same image size and channels (a quick.yaml run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PSNR_GAIN_TARGET = 3.0  # dB
RECOVERY_TARGET = 0.5  # share of the top-1 lost to blur


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", required=True, help="a finished classification run (quick.yaml)")
    parser.add_argument("--config", default=str(REPO / "models/resnet/deblur.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", help="a finished deblurring run to test instead of training one")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import shared  # noqa: F401  (first: it sets the host allocator before TensorFlow starts)
    from shared import lifecycle
    from shared.config import load_config
    from shared.deblur.task import evaluate_with_classifier
    from shared.runs import open_run
    from shared.tasks import rebuild, rebuilt

    started = time.time()
    if args.run:
        run_path = Path(args.run)
    else:
        run_path = lifecycle.train(load_config(args.config, args.set), argv=["bench_deblur.py", *argv]).path
    trained = time.time() - started
    run = open_run(run_path)
    metrics = evaluate_with_classifier(rebuild(run)[0], run, rebuilt(open_run(args.classifier)))
    c = metrics["classifier"]
    took = "" if args.run else f"{trained:.0f} s to train and test, "
    print(f"run {run_path} ({took}{metrics['examples']} test images)")
    print(f"PSNR blurred {metrics['psnr_blurred']:.2f} dB, restored {metrics['psnr_restored']:.2f} dB, "
          f"gain {metrics['psnr_gain']:+.2f} dB (target >= {PSNR_GAIN_TARGET:+.1f}): "
          f"{'met' if metrics['psnr_gain'] >= PSNR_GAIN_TARGET else 'NOT met'}")
    print(f"SSIM blurred {metrics['ssim_blurred']:.4f}, restored {metrics['ssim_restored']:.4f}")
    recovered = c["recovered"]
    verdict = "n/a (blur cost nothing)" if recovered is None else \
        f"{recovered:.0%} recovered (target >= {RECOVERY_TARGET:.0%}): " \
        f"{'met' if recovered >= RECOVERY_TARGET else 'NOT met'}"
    print(f"classifier {c['run']} top-1: sharp {c['top1_sharp']:.4f}, blurred {c['top1_blurred']:.4f}, "
          f"restored {c['top1_restored']:.4f}; {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
