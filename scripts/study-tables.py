#!/usr/bin/env python3
"""Markdown tables of the experiments beside a study, for docs/RESULTS.md.

The study's own tables (means, spreads, per seed, paired differences) come from gmpq itself:
`gmpq study CONFIG --out STUDY --tables-only` prints them (and writes STUDY/results.md). This
script only lays out what lies beside a study in folders of its own:

    python3 scripts/study-tables.py runs/study runs/ablation
    python3 scripts/study-tables.py studies/runs/fmnist-lowbit --extra studies/runs/fmnist-lowbit-extra

ABLATION/*/summary.json (scripts/ablation.sh), or with --extra the low-bit study's two checks
(studies/fmnist-lowbit-extra.sh: 10-epoch fine-tunings, a 5-epoch EdMIPS search on the target).
"""
import json
import pathlib
import sys
from collections import defaultdict
from statistics import mean, stdev

LABEL = {
    "gmpq": "GMPQ (proxy)",
    "edmips": "EdMIPS (proxy)",
    "hawq": "HAWQ (proxy)",
    "edmips-target": "EdMIPS on target",
    "uniform": "best uniform",
    "random": "random",
}


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def history(training):
    """A training folder's per-epoch records (from last.json); empty when it has none."""
    meta = training / "last.json"
    return json.loads(meta.read_text()).get("history", []) if meta.exists() else []


def last_top1(training, epochs=None):
    """Top-1 of a training folder's last epoch and its epoch count, or None (`epochs`: the
    records already read)."""
    h = history(training) if epochs is None else epochs
    return (h[-1]["test_top1"], h[-1]["epoch"]) if h else None


def extra(study, folder):
    """The 10-epoch fine-tunings beside the study's 1-epoch ones, and the long target search."""
    run = study / "mnist-to-fmnist-c171-seed0"
    print("\n### Longer fine-tuning (mnist-to-fmnist, 171×, seed 0)\n")
    print("| arm | 1 epoch (study) | 10 epochs | test top-1 after each of the 10 epochs |")
    print("|---|---|---|---|")
    for ft in sorted(folder.glob("finetune10-*")):
        arm = ft.name.removeprefix("finetune10-")
        records = history(ft)
        short, long_ = last_top1(run / f"finetune-{arm}"), last_top1(ft, records)
        cell = lambda r, n: "—" if r is None else f"{r[0]:.2f}" + ("" if r[1] >= n else f" (epoch {r[1]})")
        epochs = ", ".join(f"{h['test_top1']:.2f}" for h in records)
        print(f"| {LABEL.get(arm, arm)} | {cell(short, 1)} | {cell(long_, 10)} | {epochs} |")
    cost_table(study, folder)


def cost_table(study, folder):
    """Search images and seconds of every arm at 171x seed 0 (mnist-to-fmnist), the 5-epoch
    target search among them, with the top-1 each reaches after the study's 1-epoch fine-tuning."""
    run = study / "mnist-to-fmnist-c171-seed0"
    rows = []
    for arm, label in LABEL.items():
        search, finetune = run / f"search-{arm}", run / f"finetune-{arm}"
        if arm == "edmips-target":
            rows.append((label + ", 1 epoch", search, finetune))
            search, finetune = folder / "search-edmips-target-5ep", folder / "finetune-edmips-target-5ep"
            label += ", 5 epochs"
        rows.append((label, search, finetune))
    print("\n### Search cost against accuracy (mnist-to-fmnist, 171×, seed 0)\n")
    print("| arm | search images | search s | top-1 after the study's fine-tuning |")
    print("|---|---|---|---|")
    for label, search, finetune in rows:
        policy = search / "policy.json"
        if not policy.exists():
            print(f"| {label} | — | — | — |")
            continue
        cost = json.loads(policy.read_text()).get("meta", {}).get("cost", {})
        top1 = last_top1(finetune)
        print(
            f"| {label} | {cost.get('images_processed', 0)} | {cost.get('wall_seconds', 0):.0f} | "
            f"{fmt(top1 and top1[0])} |"
        )


def main():
    args = sys.argv[1:]
    extra_dir = None
    if "--extra" in args:
        i = args.index("--extra")
        extra_dir = pathlib.Path(args[i + 1])
        del args[i : i + 2]
    sys.argv[1:] = args
    study = pathlib.Path(sys.argv[1])
    rows = json.loads((study / "results.json").read_text())["rows"]
    per_seed = defaultdict(dict)
    for r in rows:
        if r["top1"] is not None:
            per_seed[(r["pair"], r["compression_target"], r["arm"])][r["seed"]] = r["top1"]
    if extra_dir is not None:
        extra(study, extra_dir)
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
