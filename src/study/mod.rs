//! The generalisation study: several (proxy → target) pairs, budgets and seeds, every arm of
//! each run at the same budget and fine-tuning recipe, aggregated into one results table.

#[cfg(feature = "cli")]
mod args;
mod run;
mod slurm;
mod tables;

#[cfg(feature = "cli")]
pub use args::{StudyArgs, StudyOutcome};
pub use run::{array_index_from_env, check_inputs, run, run_selected, tables_only, write_tables};
pub use slurm::{sbatch_script, ArraySettings};
pub use tables::{
    aggregate, collect, markdown, mean_std, paired_differences, write_results, ArmStats,
    PairedDifference, ResultRow, LEADS,
};

use crate::pipeline::{Arm, ArmSummary, PipelineError, RunLayout, RunSummary};
use crate::policy::{Policy, PolicyError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    #[error("{0}")]
    Invalid(String),
}

/// A full-precision teacher the study trains once and shares between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherConfig {
    /// KIND:PATH[:N] of the data it trains on.
    pub data: String,
    pub epochs: usize,
    #[serde(default)]
    pub hflip: bool,
}

/// One (proxy → target) pair and the budgets it is searched at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairConfig {
    pub name: String,
    /// The proxy teacher (its data is the search's proxy).
    pub proxy: TeacherConfig,
    /// Compression budgets, each with its number of seeds.
    pub budgets: Vec<BudgetConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetConfig {
    pub compression: f64,
    pub seeds: usize,
}

/// `gmpq study CONFIG`: what to run. Every run gets the same target teacher, arms and recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyConfig {
    #[serde(default = "default_model")]
    pub model: String,
    /// The width multiplier of mobilenetv2 (1 elsewhere; left out of study.json when 1).
    #[serde(default = "unit_width", skip_serializing_if = "is_unit_width")]
    pub width: f64,
    /// The target teacher; its data (without a subset) is the target.
    pub target: TeacherConfig,
    pub pairs: Vec<PairConfig>,
    pub arms: Vec<Arm>,
    pub search_epochs: usize,
    /// Epochs of the EdMIPS search on the full target.
    pub target_search_epochs: usize,
    pub finetune_epochs: usize,
    /// Fine-tuning data augmentation (the target's).
    #[serde(default)]
    pub hflip: bool,
    /// Target training images held out for validation (the target teacher and every
    /// fine-tuning leave them out; each run's chosen model is the arm best on them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<usize>,
    /// How the fine-tuned networks compute; absent: fake-quant (the studies configured before
    /// integer numerics).
    #[serde(default, skip_serializing_if = "crate::quant::Numerics::is_fake_quant")]
    pub numerics: crate::quant::Numerics,
}

fn default_model() -> String {
    "resnet20".into()
}

fn unit_width() -> f64 {
    1.0
}

fn is_unit_width(w: &f64) -> bool {
    *w == 1.0
}

impl StudyConfig {
    pub fn load(path: &Path) -> Result<Self, StudyError> {
        let err = |reason: String| StudyError::Config {
            path: path.into(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let c: StudyConfig = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if c.pairs.is_empty() || c.arms.is_empty() {
            return Err(err("needs at least one pair and one arm".into()));
        }
        if c.arms.contains(&Arm::Chosen) {
            return Err(err(
                "'chosen' is not an arm to run: the tables add each run's chosen model".into(),
            ));
        }
        if c.pairs.iter().any(|p| {
            p.budgets
                .iter()
                .any(|b| b.seeds == 0 || b.compression <= 1.0)
        }) {
            return Err(err(
                "every budget needs a compression above 1 and at least one seed".into(),
            ));
        }
        Ok(c)
    }

    /// Every run of the study: (pair, budget, seed) and its folder under `out`, seed by seed
    /// (seed 0 of every pair and budget first), so that a study stopped part-way has covered
    /// every budget rather than every seed of the first one.
    pub fn runs(&self, out: &Path) -> Vec<StudyRun> {
        let max_seeds = self
            .pairs
            .iter()
            .flat_map(|p| p.budgets.iter().map(|b| b.seeds))
            .max()
            .unwrap_or(0);
        let mut runs = Vec::new();
        for seed in 0..max_seeds as u64 {
            for p in &self.pairs {
                for b in p.budgets.iter().filter(|b| seed < b.seeds as u64) {
                    runs.push(StudyRun {
                        pair: p.name.clone(),
                        compression: b.compression,
                        seed,
                        dir: out.join(format!("{}-c{}-seed{seed}", p.name, b.compression)),
                    });
                }
            }
        }
        runs
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyRun {
    pub pair: String,
    pub compression: f64,
    pub seed: u64,
    pub dir: PathBuf,
}

impl StudyRun {
    /// Whether the run has nothing left to do: its report is written and every arm has
    /// finished fine-tuning. A study skips such a run without loading its networks, so a
    /// finished run needs only its records (its checkpoints may be gone).
    pub fn finished(&self, arms: &[Arm], finetune_epochs: usize) -> Result<bool, StudyError> {
        let layout = RunLayout::new(&self.dir);
        if !layout.report().exists() {
            return Ok(false);
        }
        let summary = RunSummary::collect(&layout, arms)?;
        let trained = every_arm_finished(&summary, arms, finetune_epochs);
        // The run's summary and report were written after every arm, not before an arm was
        // added to the study (or before a pass that failed after its fine-tunings).
        let reported = std::fs::read(layout.summary())
            .ok()
            .and_then(|bytes| serde_json::from_slice::<RunSummary>(&bytes).ok())
            .is_some_and(|written| {
                arms.iter()
                    .all(|arm| written.arms.iter().any(|s| s.arm == *arm))
            });
        Ok(trained && reported)
    }
}

/// Whether every arm of `arms` has run all its `finetune_epochs` in the run `summary` describes.
fn every_arm_finished(summary: &RunSummary, arms: &[Arm], finetune_epochs: usize) -> bool {
    arms.iter().all(|arm| {
        summary
            .arms
            .iter()
            .any(|s| s.arm == *arm && finished_top1(s, finetune_epochs).is_some())
    })
}

/// An arm's accuracy once its fine-tuning has run all `finetune_epochs`: a half-trained
/// network's accuracy must not count.
fn finished_top1(arm: &ArmSummary, finetune_epochs: usize) -> Option<f64> {
    arm.top1
        .filter(|_| arm.finetune_epochs >= finetune_epochs.max(1))
}

/// Mean weight and activation bits per layer of one arm, over the runs of a (pair, budget)
/// group whose search has written its policy.
#[derive(Debug, Clone, Serialize)]
pub struct MeanBits {
    pub pair: String,
    pub compression_target: f64,
    pub arm: Arm,
    pub runs: usize,
    pub layers: Vec<String>,
    pub w_bits: Vec<f64>,
    pub a_bits: Vec<f64>,
}

/// [`MeanBits`] of every arm in `arms`, grouped as [`aggregate`] groups (pair, budget, arm).
pub fn mean_bits(runs: &[StudyRun], arms: &[Arm]) -> Result<Vec<MeanBits>, StudyError> {
    let mut groups: BTreeMap<(String, String, Arm), MeanBits> = BTreeMap::new();
    for r in runs {
        for &arm in arms {
            let path = RunLayout::new(&r.dir).policy(arm);
            if !path.exists() {
                continue;
            }
            let p = Policy::load(&path)?;
            let names: Vec<String> = p.layers.iter().map(|l| l.name.clone()).collect();
            let g = groups
                .entry(group_key(&r.pair, r.compression, arm))
                .or_insert_with(|| MeanBits {
                    pair: r.pair.clone(),
                    compression_target: r.compression,
                    arm,
                    runs: 0,
                    w_bits: vec![0.0; names.len()],
                    a_bits: vec![0.0; names.len()],
                    layers: names.clone(),
                });
            if g.layers != names {
                return Err(StudyError::Config {
                    path,
                    reason: "its layers differ from the same arm's policy in another run".into(),
                });
            }
            for (i, l) in p.layers.iter().enumerate() {
                g.w_bits[i] += l.w_bits as f64;
                g.a_bits[i] += l.a_bits as f64;
            }
            g.runs += 1;
        }
    }
    Ok(groups
        .into_values()
        .map(|mut g| {
            let n = g.runs as f64;
            g.w_bits
                .iter_mut()
                .chain(&mut g.a_bits)
                .for_each(|b| *b /= n);
            g
        })
        .collect())
}

/// The (pair, budget, arm) a row or policy is aggregated under; the budget formatted so that
/// it sorts numerically and compares exactly.
pub(super) fn group_key(pair: &str, compression: f64, arm: Arm) -> (String, String, Arm) {
    (pair.to_string(), format!("{compression:012.3}"), arm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[93.0, 94.0, 95.0]);
        assert!((m - 94.0).abs() < 1e-12);
        assert!((s - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
    }

    /// A row of pair "a" at 64×.
    fn row(seed: u64, arm: Arm, top1: Option<f64>) -> ResultRow {
        ResultRow {
            pair: "a".into(),
            compression_target: 64.0,
            seed,
            arm,
            top1,
            bops: Some(1.0),
            size_mb: Some(0.1),
            compression: Some(64.0),
            search_seconds: Some(10.0),
            search_images: Some(100),
            fp_top1: Some(95.0),
        }
    }

    #[test]
    fn aggregate_groups_by_pair_budget_arm_and_skips_unfinished() {
        let rows = vec![
            row(0, Arm::Gmpq, Some(93.0)),
            row(1, Arm::Gmpq, Some(95.0)),
            row(2, Arm::Gmpq, None),
            row(0, Arm::Edmips, Some(92.0)),
        ];
        let s = aggregate(&rows);
        assert_eq!(s.len(), 2);
        let g = s.iter().find(|s| s.arm == Arm::Gmpq).unwrap();
        assert_eq!(g.seeds, 2);
        assert!((g.top1_mean - 94.0).abs() < 1e-12);
        assert!((g.top1_std - 2f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn paired_differences_use_only_seeds_where_both_arms_finished() {
        let rows = vec![
            row(0, Arm::Gmpq, Some(94.0)),
            row(1, Arm::Gmpq, Some(93.0)),
            row(2, Arm::Gmpq, Some(95.0)),
            row(0, Arm::Edmips, Some(93.5)),
            row(1, Arm::Edmips, Some(93.5)),
            row(2, Arm::Edmips, None),
            row(3, Arm::Edmips, Some(90.0)),
            row(0, Arm::Uniform, Some(94.0)),
        ];
        let p = paired_differences(&rows);
        assert_eq!(p.len(), 2);
        let e = p.iter().find(|d| d.against == Arm::Edmips).unwrap();
        assert_eq!(e.per_seed, vec![(0, 0.5), (1, -0.5)]);
        assert_eq!((e.mean, e.ahead, e.compression_target), (0.0, 1, 64.0));
        let u = p.iter().find(|d| d.against == Arm::Uniform).unwrap();
        assert_eq!((u.per_seed.clone(), u.ahead), (vec![(0, 0.0)], 0));
    }

    #[test]
    fn mean_bits_averages_each_arms_policies_over_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let policy = |w: [u32; 2], a: [u32; 2]| Policy {
            format: crate::policy::POLICY_FORMAT,
            fp_layers: Vec::new(),
            quantizer: Default::default(),
            model: "resnet20".into(),
            input_size: 28,
            candidates: crate::policy::Candidates {
                weight: vec![2, 3, 4, 6],
                activation: vec![2, 3, 4, 6],
            },
            layers: ["layer1.0.conv1", "layer1.0.conv2"]
                .iter()
                .zip(w.iter().zip(a))
                .map(|(n, (&w_bits, a_bits))| crate::policy::LayerBits {
                    name: n.to_string(),
                    w_bits,
                    a_bits,
                })
                .collect(),
            totals: None,
            meta: None,
        };
        let runs: Vec<StudyRun> = (0..3)
            .map(|seed| StudyRun {
                pair: "a".into(),
                compression: 64.0,
                seed,
                dir: dir.path().join(format!("run{seed}")),
            })
            .collect();
        // GMPQ in all three runs, EdMIPS only in the first (the others did not search yet).
        for (r, w) in runs.iter().zip([[2, 4], [3, 4], [4, 6]]) {
            let path = RunLayout::new(&r.dir).policy(Arm::Gmpq);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            policy(w, [4, 2]).save(&path).unwrap();
        }
        let path = RunLayout::new(&runs[0].dir).policy(Arm::Edmips);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        policy([6, 6], [3, 3]).save(&path).unwrap();
        let m = mean_bits(&runs, &[Arm::Gmpq, Arm::Edmips]).unwrap();
        let g = m.iter().find(|m| m.arm == Arm::Gmpq).unwrap();
        assert_eq!(
            (g.runs, g.w_bits.clone(), g.a_bits.clone()),
            (3, vec![3.0, 14.0 / 3.0], vec![4.0, 2.0])
        );
        let e = m.iter().find(|m| m.arm == Arm::Edmips).unwrap();
        assert_eq!((e.runs, e.w_bits.clone()), (1, vec![6.0, 6.0]));

        // The study page's charts put the searched arms side by side, HAWQ among them.
        let path = RunLayout::new(&runs[1].dir).policy(Arm::Hawq);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        policy([2, 2], [6, 6]).save(&path).unwrap();
        let config: StudyConfig = serde_json::from_value(serde_json::json!({
            "target": { "data": "idx:x", "epochs": 1 },
            "pairs": [],
            "arms": ["gmpq", "edmips", "hawq", "uniform"],
            "search_epochs": 1, "target_search_epochs": 1, "finetune_epochs": 1
        }))
        .unwrap();
        let mut page = String::new();
        run::bits_charts(&config, dir.path(), &runs, &mut page).unwrap();
        assert!(page.contains("bits-a-c64-w.svg"), "{page}");
        let svg = std::fs::read_to_string(dir.path().join("bits-a-c64-w.svg")).unwrap();
        for label in ["GMPQ (3 runs)", "EdMIPS (1 runs)", "HAWQ (1 runs)"] {
            assert!(svg.contains(label), "{label} missing");
        }
    }

    /// An arm whose fine-tuning stopped after 2 of 3 epochs has no accuracy in the table.
    #[test]
    fn collect_leaves_out_unfinished_fine_tuning() {
        let dir = tempfile::tempdir().unwrap();
        let run = StudyRun {
            pair: "a".into(),
            compression: 64.0,
            seed: 0,
            dir: dir.path().join("run"),
        };
        let layout = RunLayout::new(&run.dir);
        for (arm, epochs) in [(Arm::Gmpq, 3), (Arm::Edmips, 2)] {
            crate::pipeline::write_finished_training(&layout.finetune(arm), epochs);
        }
        let rows = collect(&[run], &[Arm::Gmpq, Arm::Edmips], 3).unwrap();
        let top1 = |arm| rows.iter().find(|r| r.arm == arm).unwrap().top1;
        assert_eq!(top1(Arm::Gmpq), Some(93.0));
        assert_eq!(top1(Arm::Edmips), None);
    }

    /// A run with a validation split adds its chosen model as one more row: the numbers of the
    /// arm best on validation (here uniform, though GMPQ's test top-1 is higher).
    #[test]
    fn collect_adds_each_runs_chosen_model() {
        let dir = tempfile::tempdir().unwrap();
        let run = StudyRun {
            pair: "a".into(),
            compression: 64.0,
            seed: 0,
            dir: dir.path().join("run"),
        };
        let layout = RunLayout::new(&run.dir);
        let (gmpq, uniform) = (layout.finetune(Arm::Gmpq), layout.finetune(Arm::Uniform));
        crate::pipeline::write_validated_training(&gmpq, 3, Some(90.0));
        crate::pipeline::write_validated_training(&uniform, 2, Some(91.0));
        let rows = collect(std::slice::from_ref(&run), &[Arm::Gmpq, Arm::Uniform], 2).unwrap();
        let top1 = |arm| rows.iter().find(|r| r.arm == arm).unwrap().top1;
        assert_eq!(top1(Arm::Chosen), top1(Arm::Uniform));
        assert_eq!(top1(Arm::Chosen), Some(92.0));
        // While an arm is still to finish, the run has no chosen row yet.
        let rows = collect(
            std::slice::from_ref(&run),
            &[Arm::Gmpq, Arm::Uniform, Arm::Hawq],
            2,
        )
        .unwrap();
        assert!(rows.iter().all(|r| r.arm != Arm::Chosen), "{rows:?}");
        assert!(StudyConfig::load(Path::new("/nonexistent")).is_err());
    }

    /// A run is finished once its report is written and every arm has all its fine-tuning
    /// epochs; the checkpoint files themselves are not needed.
    #[test]
    fn finished_runs_need_a_report_and_every_arm() {
        let dir = tempfile::tempdir().unwrap();
        let run = StudyRun {
            pair: "a".into(),
            compression: 128.0,
            seed: 0,
            dir: dir.path().join("run"),
        };
        let layout = RunLayout::new(&run.dir);
        let arms = [Arm::Gmpq, Arm::Uniform];
        crate::pipeline::write_finished_training(&layout.finetune(Arm::Gmpq), 1);
        crate::pipeline::write_finished_training(&layout.finetune(Arm::Uniform), 1);
        assert!(!run.finished(&arms, 1).unwrap(), "no report yet");
        std::fs::write(layout.report(), "<html>").unwrap();
        assert!(!run.finished(&arms, 1).unwrap(), "no summary yet");
        let write_summary = |arms: &[Arm]| {
            let summary = RunSummary::collect(&layout, arms).unwrap();
            std::fs::write(layout.summary(), serde_json::to_vec(&summary).unwrap()).unwrap();
        };
        write_summary(&arms[..1]);
        assert!(
            !run.finished(&arms, 1).unwrap(),
            "a summary from before an arm was added"
        );
        write_summary(&arms);
        assert!(run.finished(&arms, 1).unwrap());
        assert!(
            !run.finished(&arms, 2).unwrap(),
            "fewer epochs than the study's"
        );
        assert!(
            !run.finished(&[Arm::Gmpq, Arm::Hawq], 1).unwrap(),
            "an arm missing"
        );
        for arm in arms {
            std::fs::remove_file(crate::train::last_checkpoint(&layout.finetune(arm))).unwrap();
        }
        assert!(
            run.finished(&arms, 1).unwrap(),
            "checkpoints are not needed"
        );
    }

    #[test]
    fn runs_come_seed_by_seed() {
        let cfg: StudyConfig = serde_json::from_value(serde_json::json!({
            "target": { "data": "idx:t", "epochs": 1 },
            "pairs": [
                { "name": "a", "proxy": { "data": "idx:a:10", "epochs": 1 },
                  "budgets": [ { "compression": 128, "seeds": 2 }, { "compression": 200, "seeds": 1 } ] },
                { "name": "b", "proxy": { "data": "idx:b:10", "epochs": 1 },
                  "budgets": [ { "compression": 128, "seeds": 2 } ] }
            ],
            "arms": ["gmpq"], "search_epochs": 1, "target_search_epochs": 1, "finetune_epochs": 1
        }))
        .unwrap();
        let order: Vec<String> = cfg
            .runs(Path::new("o"))
            .iter()
            .map(|r| r.dir.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            order,
            [
                "a-c128-seed0",
                "a-c200-seed0",
                "b-c128-seed0",
                "a-c128-seed1",
                "b-c128-seed1"
            ]
        );
    }
}
