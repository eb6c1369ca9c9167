#!/usr/bin/env python3
"""Markdown tables for docs/RESULTS.md from a study folder (and the ablation runs beside it).

    python3 scripts/study-tables.py runs/study runs/ablation

Reads STUDY/results.json (written by `gmpq study`, `--tables-only` refreshes it) and, if given,
ABLATION/*/summary.json (scripts/ablation.sh). Only finished arms (all fine-tuning epochs) are in
results.json's aggregates; per-seed rows show what exists.
"""
import json
import pathlib
import sys
from collections import defaultdict
from statistics import mean, stdev

LABEL = {
    "gmpq": "GMPQ (proxy)",
    "edmips": "EdMIPS (proxy)",
    "edmips-target": "EdMIPS on target",
    "uniform": "best uniform",
    "random": "random",
}


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def paired(res, pair, budget):
    """GMPQ minus each other arm, seed by seed (results.json's gmpq_paired)."""
    lines = []
    diffs = [d for d in res.get("gmpq_paired", []) if d["pair"] == pair and d["compression_target"] == budget]
    for d in sorted(diffs, key=lambda d: list(LABEL).index(d["against"])):
        cells = ", ".join(f"{s}: {v:+.2f}" for s, v in d["per_seed"])
        n = len(d["per_seed"])
        lines.append(f"| {LABEL[d['against']]} | {d['mean']:+.2f} | {d['gmpq_ahead']} of {n} | {cells} |")
    if lines:
        print(f"\nGMPQ minus each arm, paired by seed ({pair}, {budget:g}×):\n")
        print("| against | mean difference | GMPQ ahead | per seed |")
        print("|---|---|---|---|")
        print("\n".join(lines))


def main():
    study = pathlib.Path(sys.argv[1])
    res = json.loads((study / "results.json").read_text())
    rows = res["rows"]
    per_seed = defaultdict(dict)
    for r in rows:
        if r["top1"] is not None:
            per_seed[(r["pair"], r["compression_target"], r["arm"])][r["seed"]] = r["top1"]
    groups = sorted({(a["pair"], a["compression_target"]) for a in res["arms"]})
    for pair, budget in groups:
        arms = [a for a in res["arms"] if a["pair"] == pair and a["compression_target"] == budget]
        seeds = sorted({s for a in arms for s in per_seed[(pair, budget, a["arm"])]})
        print(f"\n### {pair}, {budget:g}×\n")
        head = "| arm | seeds | top-1 mean ± std | " + " | ".join(f"seed {s}" for s in seeds)
        print(head + " | BOPs (G) | size (MB) | search images | search s |")
        print("|---" * (len(seeds) + 7) + "|")
        for a in sorted(arms, key=lambda a: list(LABEL).index(a["arm"])):
            cells = [fmt(per_seed[(pair, budget, a["arm"])].get(s)) for s in seeds]
            spread = f" ± {a['top1_std']:.2f}" if a["seeds"] > 1 else ""
            print(
                f"| {LABEL[a['arm']]} | {a['seeds']} | {a['top1_mean']:.2f}{spread} | "
                + " | ".join(cells)
                + f" | {a['bops_mean'] / 1e9:.4f} | {a['size_mb_mean']:.3f} | "
                f"{a['search_images_mean']:.0f} | {a['search_seconds_mean']:.0f} |"
            )
        paired(res, pair, budget)
    if len(sys.argv) > 2:
        ablation = pathlib.Path(sys.argv[2])
        variants = defaultdict(dict)
        for s in sorted(ablation.glob("*/summary.json")):
            name, seed = s.parent.name.rsplit("-seed", 1)
            arm = next(a for a in json.loads(s.read_text())["arms"] if a["arm"] == "gmpq")
            record = json.loads((s.parent / "pipeline.json").read_text())
            if arm.get("top1") is not None and arm["finetune_epochs"] >= record["settings"]["finetune_epochs"]:
                variants[name][int(seed)] = arm["top1"]
        print("\n### Ablation (GMPQ arm, mnist-to-fmnist, 64×, seed-matched)\n")
        print("| variant | seeds | top-1 mean ± std | per seed | minus aw 20 (study GMPQ), paired |")
        print("|---|---|---|---|---|")
        key = ("mnist-to-fmnist", 64.0)
        reference = per_seed[key + ("gmpq",)]
        rows = [("aw 0 (study EdMIPS)", per_seed[key + ("edmips",)]), ("aw 20 (study GMPQ)", reference)]
        order = ["aw80", "aw200", "p3", "n8000"]
        rows += sorted(variants.items(), key=lambda kv: (order + [kv[0]]).index(kv[0]))
        for name, by_seed in rows:
            if not by_seed:
                continue
            v = list(by_seed.values())
            spread = f" ± {stdev(v):.2f}" if len(v) > 1 else ""
            cells = ", ".join(f"{s}: {t:.2f}" for s, t in sorted(by_seed.items()))
            diffs = {s: t - reference[s] for s, t in sorted(by_seed.items()) if s in reference}
            vs_gmpq = (
                "—"
                if by_seed is reference or not diffs
                else f"{mean(diffs.values()):+.2f} ("
                + ", ".join(f"{s}: {d:+.2f}" for s, d in diffs.items())
                + ")"
            )
            print(f"| {name} | {len(v)} | {mean(v):.2f}{spread} | {cells} | {vs_gmpq} |")


if __name__ == "__main__":
    main()
