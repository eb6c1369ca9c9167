#!/usr/bin/env python3
"""How closely the low-bit study's searches spend the budget (docs/RESULTS.md).

    python3 studies/budget-spend.py studies/runs/fmnist-lowbit

For every finished supernet search (GMPQ, EdMIPS, EdMIPS on target): the expected BOPs of the
last search epoch against the budget's BOPs (FP BOPs / compression target). For every policy a
search or HAWQ extracted: its compression, which must be at least the target. A search copied
into another run counts once.
"""
import json
import pathlib
import sys
from collections import defaultdict

SUPERNET = ("gmpq", "edmips", "edmips-target")
EXTRACTED = SUPERNET + ("hawq",)


def main():
    study = pathlib.Path(sys.argv[1])
    gaps, ratios, seen = [], defaultdict(list), set()
    for run in sorted(study.glob("*-c*-seed*")):
        for arm in EXTRACTED:
            policy = run / f"search-{arm}" / "policy.json"
            if not policy.exists():
                continue
            # A search another run copied (edmips-target: the same search) counts once.
            text = policy.read_text()
            if text in seen:
                continue
            seen.add(text)
            p = json.loads(text)
            target = p["meta"]["target"]["compression"]
            ratios[target].append(p["totals"]["compression"])
            log = run / f"search-{arm}" / "search-log.jsonl"
            if arm in SUPERNET and log.exists():
                last = json.loads(log.read_text().splitlines()[-1])
                budget = p["totals"]["fp_bops"] / target
                gaps.append(100 * (last["expected_bops"] / budget - 1))
    print(f"supernet searches: {len(gaps)}; last-epoch E[BOPs] minus budget: "
          f"{min(gaps):+.2f} % to {max(gaps):+.2f} %")
    for target, r in sorted(ratios.items()):
        print(f"{target:g}x: {len(r)} extracted policies, compression {min(r):.2f}x to {max(r):.2f}x")


if __name__ == "__main__":
    main()
