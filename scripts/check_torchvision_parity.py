"""Do the models compute torchvision's function? For each variant torchvision ships (AlexNet; GoogLeNet with its
input transform and auxiliary heads; ResNet-18/34/50/101/152; MobileNetV2 1.0): torchvision's own model with
random weights (no download; batch-norm statistics from a calibration batch of the images compared and 8 more
random ones, see shared/classification/torchvision_parity.py), its state dict saved as a .pth file, imported by
shared/classification/torchvision_weights.py, and both models' logits compared in eval mode on random images,
on photographs (matplotlib's sample photographs, plus the image files of --photos) and on Fashion-MNIST test
images (resized to RGB), all normalized as torchvision normalizes them. Needs `pip install -e '.[torch]'`.

Each model is compared twice: computing in float32, as both frameworks run it (their kernels sum in different
orders, and deep networks amplify the rounding), and in float64 from the same float32 weights, where only the
mapping can make a difference; beside them, torchvision's own float32 logits against its float64 ones, the
rounding float32 brings by itself. The last lines are one per variant: `max abs logit difference VARIANT: float32
X (torchvision's own float32 rounding R), float64 Y, logits up to Z`, each the largest over every batch and head
(GoogLeNet's aux1 / aux2 too, which torchvision's eval mode does not return: computed by its own modules).

    python scripts/check_torchvision_parity.py [--size 224] [--variants resnet50 googlenet] [--photos DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import shared  # noqa: F401 (quiets TensorFlow's C++ log before it loads)
from shared.classification import torchvision_parity as parity

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGES_PER_BATCH = 4


def sample_photographs() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [folder / "grace_hopper.jpg", folder / "Minduka_Present_Blue_Pack.png"]


def readable_photographs(folder: Path, count: int = 8) -> list[Path]:
    """The first `count` JPEG / PNG files under `folder` that decode (a messy folder holds broken ones)."""
    from PIL import Image

    found = []
    for path in sorted(folder.rglob("*")):
        if len(found) < count and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            try:
                with Image.open(path) as image:
                    image.convert("RGB")
                found.append(path)
            except Exception:  # noqa: BLE001 (a broken file is left out, whatever Pillow raises)
                continue
    return found


def batches(size: int, photos: Path | None) -> dict:
    files = sample_photographs() + (readable_photographs(photos) if photos else [])
    found = {"random images": parity.random_images(IMAGES_PER_BATCH, size, seed=2),
             "photographs": parity.folder_photographs(files, size)}
    if FASHION_MNIST.is_dir():
        found["Fashion-MNIST"] = parity.fashion_photographs(FASHION_MNIST, IMAGES_PER_BATCH, size)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--variants", nargs="+", default=list(parity.VARIANTS), choices=list(parity.VARIANTS))
    parser.add_argument("--photos", type=Path, help="a folder of photographs to add (its first 8 images)")
    args = parser.parse_args()
    images = batches(args.size, args.photos)
    # the batch-norm statistics of the images compared (and 8 more random ones), as training on such images sets them
    calibration = np.concatenate([parity.random_images(8, args.size, seed=1), *images.values()])
    print(f"{args.size} px; batches: " + ", ".join(f"{name} ({len(batch)})" for name, batch in images.items()))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants:
            started = time.time()
            result = parity.check(variant, images, Path(folder), calibration)
            results.append(result)
            for what in result.float32:
                print(f"{variant} {what}: float32 {result.float32[what]:.1e} (torchvision's own float32 rounding "
                      f"{result.torch_rounding[what]:.1e}), float64 {result.float64[what]:.1e}, logits up to "
                      f"{result.logit_scale[what]:.1f}")
            print(f"{variant}: {time.time() - started:.0f} s", flush=True)
    for result in results:
        print(f"max abs logit difference {result.variant}: float32 {result.worst('float32'):.1e} (torchvision's own "
              f"float32 rounding {result.worst('torch_rounding'):.1e}), float64 {result.worst('float64'):.1e}, "
              f"logits up to {result.worst('logit_scale'):.1f}")

if __name__ == "__main__":
    main()
