#!/usr/bin/env python3
"""Replays the pipeline's model choice on every committed study run that scored its arms on a
validation split: the old rule (best validation top-1) against the new one (the simplest
policy unless the best arm leads it beyond the noise, src/pipeline/choice.rs), scored on the
test set the choice never sees: how often the chosen arm is within 0.2 points of the best
test arm, and its mean shortfall.

The committed runs record each arm's validation and test top-1 but not its answer on each
image, so the paired test's discordant count (images exactly one of the two arms gets right)
is not known. The lead fixes their difference b − c = N·(acc_C − acc_R); their sum b + c is
taken as q·N with q the discordance measured between fine-tuned arms of the same kind
(examples/validation_discordance.rs; --discordance), and bounded both ways: the fewest
discordant images the lead allows (b + c = |b − c|, the most significant) and the most
(every image one of them misses).

    python3 studies/choice-replay.py [--discordance 0.03] [--levels 0.01,0.05,0.2]
"""
import argparse
import glob
import json
import math
import os

SIMPLE = {"uniform": 0, "uniform-fill": 1}


def tail(n, k):
    """P(X >= k), X ~ Binomial(n, 1/2)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    total = 0.0
    for i in range(k, n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + n * math.log(0.5))
    return min(total, 1.0)


def same_policy(run, a, b):
    try:
        pa = json.load(open(os.path.join(run, f"search-{a}", "policy.json")))
        pb = json.load(open(os.path.join(run, f"search-{b}", "policy.json")))
    except OSError:
        return False
    return pa.get("layers") == pb.get("layers")


def best(arms):
    # Best validation top-1; ties to uniform, uniform-fill, then the arms' order.
    order = {a["arm"]: i for i, a in enumerate(arms)}
    return max(arms, key=lambda a: (a["val_top1"], -SIMPLE.get(a["arm"], 2), -order[a["arm"]]))["arm"]


def choose_new(run, arms, n, level, q):
    names = [a["arm"] for a in arms]
    val = {a["arm"]: a["val_top1"] for a in arms}
    if "uniform-fill" in names and not ("uniform" in names and same_policy(run, "uniform", "uniform-fill")):
        ref = "uniform-fill"
    elif "uniform" in names:
        ref = "uniform"
    else:
        return best(arms)
    c = best(arms)
    if c == ref:
        return ref
    diff = round(n * (val[c] - val[ref]) / 100)  # b - c
    if q == "low":
        disc = abs(diff)
    elif q == "high":
        disc = round(n * ((100 - val[c]) + (100 - val[ref])) / 100)
    else:
        disc = max(abs(diff), round(q * n))
    b = (disc + diff) // 2
    p = tail(disc, b)
    return c if p < level / max(len(names) - 1, 1) else ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--discordance", type=float, default=0.03)
    ap.add_argument("--levels", default="0.01,0.05,0.2")
    args = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "summary.json"))):
        s = json.load(open(path))
        arms = [a for a in s["arms"] if a.get("val_top1") is not None and a.get("top1") is not None]
        if not arms:
            continue
        run = os.path.dirname(path)
        settings = json.load(open(os.path.join(run, "pipeline.json")))["settings"]
        n = settings.get("target_holdout") or 0
        runs.append((os.path.relpath(run, root), run, arms, n))
    rules = [("old: best validation top-1", lambda run, arms, n: best(arms))]
    for level in [float(x) for x in args.levels.split(",")]:
        rules.append((f"new, level {level}, q = {args.discordance}",
                      lambda run, arms, n, level=level: choose_new(run, arms, n, level, args.discordance)))
    rules.append(("new, level 0.05, fewest discordant (bound)", lambda run, arms, n: choose_new(run, arms, n, 0.05, "low")))
    rules.append(("new, level 0.05, most discordant (bound)", lambda run, arms, n: choose_new(run, arms, n, 0.05, "high")))
    print(f"{len(runs)} runs with a validation split")
    print("| rule | study | runs | chosen within 0.2 of the best test arm | mean shortfall (points) | chosen arms |")
    print("|---|---|---|---|---|---|")
    for name, rule in rules:
        by_study = {}
        for rel, run, arms, n in runs:
            study = rel.split(os.sep)[0]
            chosen = rule(run, arms, n)
            test = {a["arm"]: a["top1"] for a in arms}
            short = max(test.values()) - test[chosen]
            by_study.setdefault(study, []).append((short, chosen))
        everything = [x for v in by_study.values() for x in v]
        for study, rows in sorted(by_study.items()) + [("all", everything)]:
            within = sum(1 for s, _ in rows if s <= 0.2 + 1e-9)
            mean = sum(s for s, _ in rows) / len(rows)
            counts = {}
            for _, c in rows:
                counts[c] = counts.get(c, 0) + 1
            arms = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"| {name} | {study} | {len(rows)} | {within} | {mean:.2f} | {arms} |")


if __name__ == "__main__":
    main()
