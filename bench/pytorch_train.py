"""The same workload as `gmpq bench train`, in PyTorch, for comparison.

CIFAR ResNet-20 with 1x1-conv shortcuts (the layout gmpq builds), float32, synthetic data,
full training step (forward, cross-entropy, backward, SGD momentum 0.9 / wd 5e-4), timed over
`--steps` after `--warmup` untimed steps. Prints one JSON line.

    .venv/bin/python bench/pytorch_train.py --threads 2 --batch-size 64
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = ResNet20().train()
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
        "steps": a.steps,
        "images_per_second": a.steps * a.batch_size / sum(times),
        "median_step_seconds": times[len(times) // 2],
    }))


if __name__ == "__main__":
    main()
