#!/usr/bin/env python3
"""Brings a study folder's ranked arms (`gmpq-ranked`) to the ranking rule of
src/search/rank.rs: the search's own policy is kept unless another candidate beats it by more
than the held-out proxy images resolve (z = 2). Rankings made before the rule kept the best
score even when every candidate scored near chance.

For every run whose recorded ranking keeps another candidate under the rule, the ranked
policy and its fine-tuning are removed (with the run's summary, so the study runs the run's
tail again): the next `gmpq study` pass ranks again (the same candidates and scores, the new
choice) and fine-tunes, or copies the fine-tuning of the arm whose policy it kept. Runs whose
choice stands are left alone. Prints what it did.

    python3 studies/rerank.py studies/runs/mbv2-lowbit [--dry-run]
"""
import json
import math
import pathlib
import shutil
import sys

Z = 2.0  # search::rank::RESOLVABLE_Z


def resolvable_gain(base, best, images):
    p = min(max((base + best) / 200.0, 0.0), 1.0)
    return 100.0 * Z * math.sqrt(2.0 * p * (1.0 - p) / max(images, 1))


def choose(scores, images):
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    if scores and scores[best] - scores[0] > resolvable_gain(scores[0], scores[best], images):
        return best
    return 0


def main():
    study = pathlib.Path(sys.argv[1])
    dry = "--dry-run" in sys.argv
    for policy in sorted(study.glob("*/search-gmpq-ranked/policy.json")):
        run = policy.parent.parent
        ranking = json.loads(policy.read_text())["meta"]["ranking"]
        if "min_gain" in ranking:
            continue  # ranked under the rule
        scores = [c["val_top1"] for c in ranking["candidates"]]
        new = choose(scores, ranking["val_images"])
        old = ranking["chosen"]
        if new == old:
            print(f"{run.name}: keeps candidate {old} ({ranking['candidates'][old]['source']})")
            continue
        print(
            f"{run.name}: candidate {old} ({scores[old]:.1f} %) → {new} "
            f"({ranking['candidates'][new]['source']}, {scores[new]:.1f} %): ranked again"
        )
        if not dry:
            for d in ("search-gmpq-ranked", "finetune-gmpq-ranked"):
                shutil.rmtree(run / d, ignore_errors=True)
            (run / "summary.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
