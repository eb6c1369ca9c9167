"""Exports torchvision classification CNNs to ONNX the way a user would (torch.onnx.export, eval
mode), for `gmpq import --onnx`: the import tests and scripts/zoo.sh read these files.

    .venv/bin/python scripts/onnx_zoo.py --out DIR [--models resnet18,densenet121]
        [--exporters torchscript,dynamo] [--size 32] [--classes 10]

`resnet18_cifar` is ResNet-18 with the CIFAR stem (a 3×3 stride-1 first conv, no max-pool),
the shapes of gmpq's built-in `resnet18` at 32 px (for `gmpq bench`).

Weights are random (seeded) with batch-norm statistics and affine parameters drawn at random
too, so the exporters' batch-norm folding leaves real biases in the convs. Inputs are named
`image` and outputs `logits` (gmpq's names). One line per file: its name and its op counts.
"""

import argparse
import collections
import contextlib
import io
import json
import os
import sys
import warnings

ZOO = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
    "regnet_y_400mf", "efficientnet_b0", "mnasnet0_5", "densenet121", "googlenet",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--exporters", default="torchscript,dynamo")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    import torchvision
    import onnx

    os.makedirs(args.out, exist_ok=True)
    for name in args.models.split(","):
        torch.manual_seed(0)
        kwargs = {"num_classes": args.classes}
        if name == "googlenet":
            kwargs.update(aux_logits=False, init_weights=True)
        model = getattr(torchvision.models, name.removesuffix("_cifar"))(**kwargs)
        if name == "resnet18_cifar":
            model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            model.maxpool = torch.nn.Identity()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        model.eval()
        x = torch.rand(1, 3, args.size, args.size)
        for exporter in args.exporters.split(","):
            if exporter not in ("torchscript", "dynamo"):
                sys.exit(f"unknown exporter {exporter} (torchscript, dynamo)")
            path = os.path.join(args.out, f"{name}-{exporter}.onnx")
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(model, (x,), path, dynamo=exporter == "dynamo",
                                  input_names=["image"], output_names=["logits"])
            ops = collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
            print(json.dumps({"file": os.path.basename(path), "ops": dict(sorted(ops.items()))}), flush=True)


if __name__ == "__main__":
    main()
