//! The run directory of a whole GMPQ pipeline (teacher → search → fine-tune → report): where
//! each stage writes, and the record of what ran, so an interrupted pipeline resumes stage by
//! stage and the report can show the exact commands.

mod arms;
mod attribution_stage;
mod choice;
mod error;
mod events;
mod layout;
mod page;
mod prepare;
mod record;
mod run;
mod search_stage;
mod settings;
mod ship;
mod stage;
mod summary;

pub use attribution_stage::{attribution_grid, AttributionStage};
pub use choice::{
    choose, reference_arm, Choice, Lead, ValidateStage, ValidationPredictions, CHOICE_LEVEL,
};
pub use page::write_run_report;
pub use prepare::{budget_geometry, check_data, target_model};
pub use record::{
    copy_stage_output, reusable_stage, reusable_training, same_policy_training, RunRecord,
    StageKey, StageRecord, StageStatus, RECORD_FORMAT,
};
pub use run::{run, RunOutcome};
pub use search_stage::{RankStage, SearchKind, SearchStage};
pub use settings::{
    split_subset, target_holdout_for, PipelineSettings, DEFAULT_BASELINES, DEFAULT_BASELINES_FLAG,
    DEFAULT_BUDGET, FINETUNE_EPOCHS, TARGET_HOLDOUT, TARGET_HOLDOUT_MAX, TEACHER_EPOCHS,
};
pub use ship::{ExportStage, Shipped, AGREEMENT_FLOOR};
pub use stage::{FinetuneOf, Stage, StageContext, TrainStage};
pub use summary::{chosen_arm, RunSummary};

pub use arms::ArmSummary;
pub(crate) use error::context;
pub use error::{PipelineError, Result};
pub use events::RunEvents;
pub use layout::{training_done, training_meta, Arm, RunLayout, RECORD_FILE};

#[cfg(test)]
use std::path::{Path, PathBuf};

/// Writes the sidecar of a training that ran `epochs` epochs (test top-1 90 + epoch), as a
/// finished or interrupted run leaves it, without training anything.
#[cfg(test)]
pub(crate) fn write_finished_training(dir: &Path, epochs: usize) {
    write_validated_training(dir, epochs, None)
}

/// [`write_finished_training`] whose epochs scored `val_top1` on a validation split.
#[cfg(test)]
pub(crate) fn write_validated_training(dir: &Path, epochs: usize, val_top1: Option<f64>) {
    use crate::checkpoint::EpochMetrics;
    let model = crate::model::ModelConfig::new(crate::model::Arch::ResNet20, 1, 10, 28);
    let mut meta = crate::checkpoint::CheckpointMeta::new(
        model,
        crate::data::Pipeline {
            transforms: vec![],
            normalize: crate::data::Normalize::identity(1),
        },
    );
    meta.epoch = epochs;
    meta.history = (1..=epochs)
        .map(|epoch| EpochMetrics {
            epoch,
            lr: 0.01,
            train_loss: 0.1,
            train_top1: 95.0,
            test_loss: 0.2,
            test_top1: 90.0 + epoch as f64,
            test_top5: 99.0,
            seconds: 1.0,
            images_per_second: 1.0,
            val_top1,
            val_loss: val_top1.map(|_| 0.3),
        })
        .collect();
    let checkpoint = crate::train::last_checkpoint(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&checkpoint, b"weights").unwrap();
    std::fs::write(
        crate::checkpoint::sidecar_path(&checkpoint),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_chosen_arm_is_the_best_on_validation_ties_to_uniform() {
        let arm = |arm, val: Option<f64>, top1| ArmSummary {
            top1: Some(top1),
            val_top1: val,
            ..ArmSummary::new(arm)
        };
        // The test set would pick GMPQ; validation picks EdMIPS.
        let arms = vec![
            arm(Arm::Gmpq, Some(90.0), 95.0),
            arm(Arm::Edmips, Some(91.0), 90.0),
            arm(Arm::Uniform, Some(90.5), 90.0),
        ];
        assert_eq!(chosen_arm(&arms), Some(Arm::Edmips));
        let tie = vec![
            arm(Arm::Gmpq, Some(91.0), 95.0),
            arm(Arm::Uniform, Some(91.0), 90.0),
        ];
        assert_eq!(chosen_arm(&tie), Some(Arm::Uniform));
        assert_eq!(chosen_arm(&[arm(Arm::Gmpq, None, 95.0)]), None);
    }

    use super::*;

    #[test]
    fn settings_change_names_the_fields() {
        let rec = RunRecord {
            format: RECORD_FORMAT,
            command: String::new(),
            settings: serde_json::json!({"model": "resnet20", "finetune_epochs": 3}),
            arms: vec![Arm::Gmpq],
            stages: vec![],
        };
        let dir = Path::new("runs/x");
        assert!(rec.check_settings(dir, &rec.settings.clone()).is_ok());
        let err = rec
            .check_settings(
                dir,
                &serde_json::json!({"model": "resnet32", "finetune_epochs": 3}),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model: was \"resnet20\", now \"resnet32\""),
            "{err}"
        );
        assert!(!err.contains("finetune_epochs"), "{err}");
    }

    /// Run `name` with a uniform policy (`policy` bytes) whose fine-tuning finished `epochs`
    /// epochs, recorded with the command `gmpq finetune --out DIR/finetune-uniform`.
    fn run_with_finetune(root: &Path, name: &str, policy: &[u8], epochs: usize) -> RunLayout {
        let layout = RunLayout::new(root.join(name));
        std::fs::create_dir_all(layout.search(Arm::Uniform)).unwrap();
        std::fs::write(layout.policy(Arm::Uniform), policy).unwrap();
        if epochs > 0 {
            write_finished_training(&layout.finetune(Arm::Uniform), epochs);
        }
        let mut rec = RunRecord {
            format: RECORD_FORMAT,
            command: String::new(),
            settings: serde_json::Value::Null,
            arms: vec![Arm::Uniform],
            stages: vec![],
        };
        rec.set_stage(StageRecord {
            name: "finetune-uniform".into(),
            command: command(&layout),
            seconds: 42.0,
            status: StageStatus::Done,
            reused_from: None,
            identity: None,
        });
        rec.save(&layout.record()).unwrap();
        layout
    }

    fn command(l: &RunLayout) -> String {
        format!("gmpq finetune --out {}", l.finetune(Arm::Uniform).display())
    }

    /// A key whose command is `command_for`'s (records without identities match by it).
    fn by_command(
        command_for: &dyn Fn(&RunLayout) -> String,
    ) -> impl Fn(&RunLayout) -> StageKey + '_ {
        move |l| StageKey {
            command: command_for(l),
            identity: serde_json::Value::Null,
        }
    }

    /// Reuse compares typed identities: a recorded command spelled differently (a renamed
    /// flag) is the same computation, another identity is not; records from before identities
    /// existed are still matched by their command.
    #[test]
    fn a_renamed_flag_does_not_change_a_stage_identity() {
        use super::stage::{FinetuneOf, Stage, TrainStage};
        let root = tempfile::tempdir().unwrap();
        let ours = run_with_finetune(root.path(), "ours", b"w4a4", 0);
        let theirs = run_with_finetune(root.path(), "theirs", b"w4a4", 3);
        let stage = |l: &RunLayout, seed: u64| TrainStage {
            name: "finetune-uniform".into(),
            model: "resnet20".into(),
            width: 1.0,
            data: "idx:d".into(),
            limit: None,
            subset_seed: 0,
            holdout: 0,
            test_limit: None,
            epochs: 3,
            hflip: false,
            seed,
            out: l.finetune(Arm::Uniform),
            finetune: Some(FinetuneOf {
                init: "t.safetensors".into(),
                policy: l.policy(Arm::Uniform),
                lr: 0.01,
                numerics: crate::quant::Numerics::FakeQuant,
            }),
        };
        // Their record: our identity for their paths, under a command with a renamed flag.
        let mut rec = RunRecord::load(&theirs.record()).unwrap().unwrap();
        rec.set_stage(StageRecord {
            command: stage(&theirs, 0).command().replace("--epochs", "--passes"),
            identity: Some(stage(&theirs, 0).identity()),
            ..rec.stage("finetune-uniform").unwrap().clone()
        });
        rec.save(&theirs.record()).unwrap();
        let identity = stage(&ours, 0).identity().to_string();
        assert!(
            !identity.contains("--"),
            "an identity holds no flag: {identity}"
        );
        let find = |seed: u64| {
            reusable_training(
                &ours,
                std::slice::from_ref(&theirs.dir),
                Arm::Uniform,
                "finetune-uniform",
                3,
                |l| StageKey::of(&stage(l, seed)),
            )
            .unwrap()
        };
        assert!(
            find(0).is_some(),
            "the same computation under a renamed flag"
        );
        assert!(find(1).is_none(), "another seed is another computation");
    }

    #[test]
    fn a_finished_identical_training_elsewhere_is_found_and_copied() {
        let root = tempfile::tempdir().unwrap();
        let ours = run_with_finetune(root.path(), "ours", b"w4a4", 0);
        let unfinished = run_with_finetune(root.path(), "unfinished", b"w4a4", 2);
        let other_policy = run_with_finetune(root.path(), "other-policy", b"w3a3", 3);
        let same = run_with_finetune(root.path(), "same", b"w4a4", 3);
        let find = |others: &[&RunLayout], command_for: &dyn Fn(&RunLayout) -> String| {
            let dirs: Vec<PathBuf> = others.iter().map(|l| l.dir.clone()).collect();
            reusable_training(
                &ours,
                &dirs,
                Arm::Uniform,
                "finetune-uniform",
                3,
                by_command(command_for),
            )
            .unwrap()
        };
        assert_eq!(find(&[&ours, &unfinished, &other_policy], &command), None);
        let found = find(&[&unfinished, &other_policy, &same], &command).unwrap();
        assert_eq!(found.reused_from, Some(same.finetune(Arm::Uniform)));
        assert_eq!((found.seconds, found.command), (42.0, command(&same)));
        // Another recipe (here: another seed) is another computation.
        let seed1 = |l: &RunLayout| format!("{} --seed 1", command(l));
        assert_eq!(find(&[&same], &seed1), None);

        copy_stage_output(&same.finetune(Arm::Uniform), &ours.finetune(Arm::Uniform)).unwrap();
        assert!(training_done(&ours.finetune(Arm::Uniform), 3).unwrap());
        assert_eq!(
            std::fs::read(crate::train::last_checkpoint(&ours.finetune(Arm::Uniform))).unwrap(),
            b"weights"
        );
    }

    #[test]
    fn stages_are_replaced_in_place() {
        let mut rec = RunRecord {
            format: RECORD_FORMAT,
            command: String::new(),
            settings: serde_json::Value::Null,
            arms: vec![],
            stages: vec![],
        };
        for (name, s) in [("a", 1.0), ("b", 2.0), ("a", 3.0)] {
            rec.set_stage(StageRecord {
                name: name.into(),
                command: String::new(),
                seconds: s,
                status: StageStatus::Done,
                reused_from: None,
                identity: None,
            });
        }
        assert_eq!(rec.stages.len(), 2);
        assert_eq!(rec.stage("a").map(|s| s.seconds), Some(3.0));
        assert_eq!(rec.stages[0].name, "a");
    }
}
