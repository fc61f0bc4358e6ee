"""Print each canonical model's parameters and multiply-adds at 224 px / 1000 classes beside the
figures its paper and the reference implementations give.

    python scripts/model_table.py
"""

from __future__ import annotations



from shared.modelzoo import MODELS_DIR, load_model_module, inference_model  # noqa: E402
from shared.sizing import multiply_adds, trainable_parameters  # noqa: E402

# (model folder, hyperparameters, label, reference parameters and source, paper multiply-adds)
ROWS = [
    ("alexnet", {}, "AlexNet", "61,100,840 (torchvision; paper ~60M)", "~0.7 G"),
    ("alexnet", {"two_towers": True}, "AlexNet, two towers", "60,965,224 (Caffe bvlc_alexnet)", "~0.7 G"),
    ("googlenet", {}, "GoogLeNet (paper form)", "~6.8M (paper Table 1)", "1.5 G"),
    ("googlenet", {"batch_norm": True, "kernel_5x5": 3}, "GoogLeNet (torchvision form)",
     "6,624,904 (torchvision)", "1.5 G"),
    ("resnet", {"depth": 18}, "ResNet-18", "11,689,512 (torchvision)", "1.8 G"),
    ("resnet", {"depth": 34}, "ResNet-34", "21,797,672 (torchvision)", "3.6 G"),
    ("resnet", {"depth": 50}, "ResNet-50", "25,557,032 (torchvision)", "3.8 G"),
    ("resnet", {"depth": 101}, "ResNet-101", "44,549,160 (torchvision)", "7.6 G"),
    ("resnet", {"depth": 152}, "ResNet-152", "60,192,808 (torchvision)", "11.3 G"),
    ("mobilenet_v2", {"alpha": 1.0}, "MobileNetV2 1.0", "3,538,984 (Keras Applications, all weights)", "300 M"),
    ("mobilenet_v2", {"alpha": 0.35}, "MobileNetV2 0.35", "1,691,208 (Keras Applications, all weights)", "59 M"),
]


def main() -> None:
    header = f"{'model':30} {'trainable params':>17} {'all weights':>12} {'mult-adds':>10}  {'paper':>7}  reference"
    print(header)
    print("-" * len(header))
    for folder, hparams, label, reference, paper_macs in ROWS:
        model = inference_model(load_model_module(MODELS_DIR / folder).build(1000, (224, 224, 3), **hparams))
        print(f"{label:30} {trainable_parameters(model):>17,} {model.count_params():>12,} "
              f"{multiply_adds(model) / 1e9:>9.2f}G  {paper_macs:>7}  {reference}", flush=True)


if __name__ == "__main__":
    main()
