//! The study's tables from its runs' records: one row per arm and run, the mean and spread
//! per (pair, budget, arm), the paired differences, written as CSV, JSON and Markdown.

use super::group_key;
use super::{every_arm_finished, finished_top1, StudyError, StudyRun};
use crate::pipeline::{Arm, ArmSummary, RunLayout, RunSummary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One row of the results table: one arm of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultRow {
    pub pair: String,
    pub compression_target: f64,
    pub seed: u64,
    pub arm: Arm,
    pub top1: Option<f64>,
    pub bops: Option<f64>,
    pub size_mb: Option<f64>,
    pub compression: Option<f64>,
    pub search_seconds: Option<f64>,
    pub search_images: Option<u64>,
    pub fp_top1: Option<f64>,
}

/// Mean and sample standard deviation of an arm over seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmStats {
    pub pair: String,
    pub compression_target: f64,
    pub arm: Arm,
    pub seeds: usize,
    pub top1_mean: f64,
    pub top1_std: f64,
    pub bops_mean: f64,
    pub size_mb_mean: f64,
    pub search_seconds_mean: f64,
    pub search_images_mean: f64,
}

pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    (m, var.sqrt())
}

/// Reads every run's outputs (as far as they got) into rows. An arm has an accuracy only
/// once its fine-tuning has run all `finetune_epochs`: a half-trained network's accuracy
/// must not enter the means.
pub fn collect(
    runs: &[StudyRun],
    arms: &[Arm],
    finetune_epochs: usize,
) -> Result<Vec<ResultRow>, StudyError> {
    let mut rows = Vec::new();
    for r in runs {
        let s = RunSummary::collect(&RunLayout::new(&r.dir), arms)?;
        // The run's chosen model, as one more row (runs with a validation split), once every
        // arm has finished: a choice among some arms is not the run's.
        let all_finished = every_arm_finished(&s, arms, finetune_epochs);
        let chosen = s
            .chosen
            .filter(|_| all_finished)
            .and_then(|c| s.arms.iter().find(|a| a.arm == c))
            .map(|a| ArmSummary {
                arm: Arm::Chosen,
                ..a.clone()
            });
        for a in s.arms.into_iter().chain(chosen) {
            rows.push(ResultRow {
                pair: r.pair.clone(),
                compression_target: r.compression,
                seed: r.seed,
                arm: a.arm,
                top1: finished_top1(&a, finetune_epochs),
                bops: a.bops,
                size_mb: a.size_mb,
                compression: a.compression,
                search_seconds: a.search_seconds,
                search_images: a.search_images,
                fp_top1: s.fp_top1,
            });
        }
    }
    Ok(rows)
}

/// Aggregates finished rows (those with an accuracy) per (pair, budget, arm).
pub fn aggregate(rows: &[ResultRow]) -> Vec<ArmStats> {
    let mut groups: BTreeMap<(String, String, Arm), Vec<&ResultRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.top1.is_some()) {
        groups
            .entry(group_key(&r.pair, r.compression_target, r.arm))
            .or_default()
            .push(r);
    }
    groups
        .into_values()
        .map(|g| {
            let f = |k: fn(&ResultRow) -> Option<f64>| -> Vec<f64> {
                g.iter().filter_map(|r| k(r)).collect()
            };
            let (top1_mean, top1_std) = mean_std(&f(|r| r.top1));
            ArmStats {
                pair: g[0].pair.clone(),
                compression_target: g[0].compression_target,
                arm: g[0].arm,
                seeds: g.len(),
                top1_mean,
                top1_std,
                bops_mean: mean_std(&f(|r| r.bops)).0,
                size_mb_mean: mean_std(&f(|r| r.size_mb)).0,
                search_seconds_mean: mean_std(&f(|r| r.search_seconds)).0,
                search_images_mean: mean_std(&f(|r| r.search_images.map(|n| n as f64))).0,
            }
        })
        .collect()
}

/// One arm (`lead`: GMPQ, GMPQ ranked, the chosen model) against another arm of the same
/// (pair, budget), seed by seed: the claims are about these paired differences, and pairing
/// removes the spread that the shared teacher, search seed and fine-tuning seed put into both
/// arms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedDifference {
    pub pair: String,
    pub compression_target: f64,
    pub lead: Arm,
    pub against: Arm,
    /// (seed, lead top-1 − the other arm's top-1), over the seeds where both finished.
    pub per_seed: Vec<(u64, f64)>,
    pub mean: f64,
    /// Seeds where the lead is strictly ahead.
    pub ahead: usize,
}

/// The arms whose paired differences the tables show, in this order.
pub const LEADS: [Arm; 3] = [Arm::Gmpq, Arm::GmpqRanked, Arm::Chosen];

/// [`PairedDifference`]s of each of [`LEADS`] against every other arm, from finished rows.
pub fn paired_differences(rows: &[ResultRow]) -> Vec<PairedDifference> {
    // (pair, budget, arm) → (budget, seed → top-1)
    type Finished = BTreeMap<(String, String, Arm), (f64, BTreeMap<u64, f64>)>;
    let mut top1 = Finished::new();
    for r in rows {
        if let Some(t) = r.top1 {
            top1.entry(group_key(&r.pair, r.compression_target, r.arm))
                .or_insert_with(|| (r.compression_target, BTreeMap::new()))
                .1
                .insert(r.seed, t);
        }
    }
    let mut out = Vec::new();
    for lead in LEADS {
        for ((pair, budget, arm), (compression_target, other)) in &top1 {
            let leading = match top1.get(&(pair.clone(), budget.clone(), lead)) {
                Some((_, g)) if *arm != lead && (*arm != Arm::Chosen || lead == Arm::Chosen) => g,
                _ => continue,
            };
            let per_seed: Vec<(u64, f64)> = other
                .iter()
                .filter_map(|(seed, t)| leading.get(seed).map(|g| (*seed, g - t)))
                .collect();
            if per_seed.is_empty() {
                continue;
            }
            let diffs: Vec<f64> = per_seed.iter().map(|(_, d)| *d).collect();
            out.push(PairedDifference {
                pair: pair.clone(),
                compression_target: *compression_target,
                lead,
                against: *arm,
                mean: mean_std(&diffs).0,
                ahead: diffs.iter().filter(|d| **d > 0.0).count(),
                per_seed,
            });
        }
    }
    out
}

/// Writes `results.csv` (one row per arm and run), `results.json` (rows, aggregates and the
/// paired differences) and `results.md` (the same tables in Markdown, [`markdown`]).
pub fn write_results(
    out: &Path,
    rows: &[ResultRow],
    stats: &[ArmStats],
    paired: &[PairedDifference],
) -> Result<(), StudyError> {
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    let mut csv = String::from(
        "pair,compression_target,seed,arm,top1,fp_top1,bops,compression,size_mb,search_seconds,search_images\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            r.pair,
            r.compression_target,
            r.seed,
            r.arm.name(),
            opt(r.top1),
            opt(r.fp_top1),
            opt(r.bops),
            opt(r.compression),
            opt(r.size_mb),
            opt(r.search_seconds),
            r.search_images.map_or(String::new(), |n| n.to_string()),
        ));
    }
    let write = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        crate::files::write_atomic(&path, bytes)
            .map_err(|source| StudyError::Write { path, source })
    };
    write("results.csv", csv.as_bytes())?;
    let json = serde_json::to_vec_pretty(
        &serde_json::json!({"rows": rows, "arms": stats, "paired": paired}),
    )
    .unwrap_or_default();
    write("results.json", &json)?;
    write("results.md", markdown(rows, stats, paired).as_bytes())
}

/// `12.34` or `—`.
fn cell(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.2}"))
}

/// The study's tables in Markdown, one section per (pair, budget): every arm's top-1 (mean ±
/// sample std over seeds, and per seed), cost and search compute; the FP target teacher; and
/// the paired differences of GMPQ, GMPQ ranked and the chosen model against each other arm.
/// `gmpq study --tables-only` prints it; docs/RESULTS.md quotes it.
pub fn markdown(rows: &[ResultRow], stats: &[ArmStats], paired: &[PairedDifference]) -> String {
    use std::fmt::Write as _;
    let mut groups: Vec<(String, f64)> = stats
        .iter()
        .map(|s| (s.pair.clone(), s.compression_target))
        .collect();
    groups.dedup();
    let mut md = String::new();
    for (pair, budget) in groups {
        let in_group = |p: &str, b: f64| p == pair && b == budget;
        let group_rows: Vec<&ResultRow> = rows
            .iter()
            .filter(|r| in_group(&r.pair, r.compression_target))
            .collect();
        let seeds: std::collections::BTreeSet<u64> = group_rows
            .iter()
            .filter(|r| r.top1.is_some())
            .map(|r| r.seed)
            .collect();
        let _ = writeln!(md, "### {pair}, {budget}×\n");
        let _ = write!(md, "| arm | seeds | top-1 mean ± std |");
        for s in &seeds {
            let _ = write!(md, " seed {s} |");
        }
        let _ = writeln!(
            md,
            " compression | BOPs (G) | size (MB) | search images | search s |"
        );
        let _ = writeln!(md, "{}|", "|---".repeat(seeds.len() + 8));
        for s in stats
            .iter()
            .filter(|s| in_group(&s.pair, s.compression_target))
        {
            let top1 = |seed: u64| {
                group_rows
                    .iter()
                    .find(|r| r.arm == s.arm && r.seed == seed)
                    .and_then(|r| r.top1)
            };
            let compressions: Vec<f64> = group_rows
                .iter()
                .filter(|r| r.arm == s.arm && r.top1.is_some())
                .filter_map(|r| r.compression)
                .collect();
            let spread = if s.seeds > 1 {
                format!(" ± {:.2}", s.top1_std)
            } else {
                String::new()
            };
            let _ = write!(
                md,
                "| {} | {} | {:.2}{spread} |",
                s.arm.label(),
                s.seeds,
                s.top1_mean
            );
            for &seed in &seeds {
                let _ = write!(md, " {} |", cell(top1(seed)));
            }
            let _ = writeln!(
                md,
                " {:.2}× | {:.4} | {:.3} | {:.0} | {:.0} |",
                mean_std(&compressions).0,
                s.bops_mean / 1e9,
                s.size_mb_mean,
                s.search_images_mean,
                s.search_seconds_mean
            );
        }
        if let Some(fp) = group_rows.iter().find_map(|r| r.fp_top1) {
            let _ = writeln!(md, "\nFP target teacher: {fp:.2} % top-1.");
        }
        let diffs: Vec<&PairedDifference> = paired
            .iter()
            .filter(|d| in_group(&d.pair, d.compression_target))
            .collect();
        if !diffs.is_empty() {
            let _ = writeln!(
                md,
                "\nPaired by seed (lead minus arm; ahead: seeds where the lead is strictly ahead):\n"
            );
            let _ = writeln!(md, "| lead | minus | mean | ahead | per seed |");
            let _ = writeln!(md, "|---|---|---|---|---|");
            for d in diffs {
                let per_seed: Vec<String> = d
                    .per_seed
                    .iter()
                    .map(|(s, v)| format!("{s}: {v:+.2}"))
                    .collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {:+.2} | {} of {} | {} |",
                    d.lead.label(),
                    d.against.label(),
                    d.mean,
                    d.ahead,
                    d.per_seed.len(),
                    per_seed.join(", ")
                );
            }
        }
        md.push('\n');
    }
    md
}
