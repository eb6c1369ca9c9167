#!/usr/bin/env python3
"""Where the searches' final α put their probability: for each finished run of a study and each
searched arm, the mean over layers of softmax(α/T) per candidate width (weights and
activations), and the policy's mean bits. Usage: python3 studies/alpha-mass.py [STUDY_DIR]"""
import json
import math
import pathlib
import sys

study = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "studies/runs/fmnist-lowbit")


def softmax(v, t):
    top = max(v)
    e = [math.exp((x - top) / t) for x in v]
    total = sum(e)
    return [x / total for x in e]


print("run\tarm\tkind\tmass per width\tmedian max-prob\tmean bits")
for run in sorted(study.glob("*-c*-seed*")):
    for arm in ["gmpq", "edmips", "edmips-target"]:
        path = run / f"search-{arm}" / "policy.json"
        if not path.exists():
            continue
        policy = json.loads(path.read_text())
        alpha = policy.get("meta", {}).get("alpha")
        if not alpha:
            continue
        t = alpha["temperature"]
        for kind, key in [("weight", "w_bits"), ("activation", "a_bits")]:
            probs = [softmax(v, t) for v in alpha[kind].values()]
            widths = alpha["bits"][kind]
            mass = [sum(p[i] for p in probs) / len(probs) for i in range(len(widths))]
            peaks = sorted(max(p) for p in probs)
            bits = sum(l[key] for l in policy["layers"]) / len(policy["layers"])
            cells = " ".join(f"{w}:{m:.2f}" for w, m in zip(widths, mass))
            print(f"{run.name}\t{arm}\t{kind}\t{cells}\t{peaks[len(peaks) // 2]:.2f}\t{bits:.2f}")
