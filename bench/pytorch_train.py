"""The same workload as `gmpq bench train`, in PyTorch, for comparison.

CIFAR ResNet-20 with 1x1-conv shortcuts (the layout gmpq builds), float32, synthetic data,
full training step (forward, cross-entropy, backward, SGD momentum 0.9 / wd 5e-4), timed over
`--steps` after `--warmup` untimed steps. Prints one JSON line.

With `--policy FILE` (a gmpq policy for resnet20, e.g. bench/resnet20-mixed.json) the
quantized convolutions use the reference GMPQ quantizers written the authors' way (half-wave
PACT activation quantizer, symmetric weight quantizer with a threshold fixed at the first
call, straight-through estimators): the QAT step `gmpq bench train --policy FILE` times.

    .venv/bin/python bench/pytorch_train.py --threads 2 --batch-size 64
    .venv/bin/python bench/pytorch_train.py --threads 2 --batch-size 64 --policy bench/resnet20-mixed.json
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return F.relu(out + sc)


class QuantConv(nn.Module):
    """The reference's quantized conv: activation and weight fake quantizers with STEs."""

    def __init__(self, conv, w_bits, a_bits):
        super().__init__()
        self.conv = conv
        self.w_bits, self.a_bits = w_bits, a_bits
        self.register_buffer("weight_range", torch.zeros(()))
        self.act_range = nn.Parameter(torch.tensor(6.0))

    def forward(self, x):
        r = self.act_range
        ori = 0.5 * (x.abs() - (x - r).abs() + r)
        s = r.item() / (2 ** self.a_bits - 1)
        q = (ori / s).round() * s
        xq = q.detach() + ori - ori.detach()
        w = self.conv.weight
        if self.weight_range.item() <= 0:
            with torch.no_grad():
                self.weight_range.copy_(w.abs().max())
        t = self.weight_range
        sw = t / (2 ** (self.w_bits - 1) - 1)
        wq = (torch.max(torch.min(w, t), -t) / sw).round() * sw
        wq = wq.detach() + w - w.detach()
        return F.conv2d(xq, wq, None, self.conv.stride, self.conv.padding)


def quantize(net, policy_path):
    """Wraps the policy's layers (gmpq names: layerS.I.conv1 → blocks.3(S−1)+I.conv1)."""
    with open(policy_path) as f:
        policy = json.load(f)
    for layer in policy["layers"]:
        stage, block, rest = layer["name"].split(".", 2)
        path = f"blocks.{3 * (int(stage[5:]) - 1) + int(block)}.{rest}"
        parent_path, _, attr = path.rpartition(".")
        parent = net.get_submodule(parent_path)
        setattr(parent, attr, QuantConv(getattr(parent, attr), layer["w_bits"], layer["a_bits"]))
    return net


class ResNet20(nn.Module):
    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for stage, width in enumerate([16, 32, 64]):
            for i in range(3):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--channels-last",
        action="store_true",
        help="model and input in torch.channels_last (gmpq's training layout)",
    )
    ap.add_argument("--policy", help="a gmpq policy JSON for resnet20: time the QAT step")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = ResNet20().train()
    if a.policy:
        net = quantize(net, a.policy)
    if a.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size)
    y = torch.randint(0, 10, (a.batch_size,))
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({
        "engine": f"pytorch {torch.__version__}",
        "batch_size": a.batch_size,
        "threads": torch.get_num_threads(),
        "param_layout": "channels-last" if a.channels_last else "contiguous",
        "precision": f"fixed policy {a.policy}" if a.policy else "full",
        "steps": a.steps,
        "images_per_second": a.steps * a.batch_size / sum(times),
        "median_step_seconds": times[len(times) // 2],
    }))


if __name__ == "__main__":
    main()
