//! A whole run (teachers → policies → fine-tuning → report) from [`PipelineSettings`]: every
//! input checked before anything is created, each stage recorded in `pipeline.json` with its
//! command and skipped when its output exists, so an interrupted run resumes.

use super::attribution_stage::AttributionStage;
use super::choice::ValidateStage;
use super::events::RunEvents;
use super::prepare::{open_record, settled, supernet, Plan};
use super::search_stage::{RankStage, SearchKind, SearchStage};
use super::ship::ExportStage;
use super::stage::{FinetuneOf, Stage, StageContext, TrainStage};
use super::{
    copy_stage_output, reusable_stage, reusable_training, same_policy_training, Arm, PipelineError,
    PipelineSettings, Result, RunLayout, RunRecord, RunSummary, StageKey, StageRecord, StageStatus,
};
use crate::files::DirLock;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A finished run: its summary (also in `summary.json`) and its HTML report.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub summary: RunSummary,
    pub report: PathBuf,
    pub seconds: f64,
}

/// Runs stages, keeping `pipeline.json` current after each.
struct Runner<'a> {
    layout: RunLayout,
    record: RunRecord,
    ctx: StageContext<'a>,
}

impl Runner<'_> {
    fn save(&self) -> Result<()> {
        self.record.save(&self.layout.record())
    }

    fn set(&mut self, stage: &dyn Stage, seconds: f64, status: StageStatus) -> Result<()> {
        self.record.set_stage(StageRecord {
            name: stage.name(),
            command: stage.command(),
            seconds,
            status,
            reused_from: None,
            identity: Some(stage.identity()),
        });
        self.save()
    }

    /// Runs `stage` unless its output exists, recording its command and wall time.
    fn stage(&mut self, stage: &dyn Stage) -> Result<()> {
        let name = stage.name();
        if stage.done()? {
            self.ctx
                .events
                .stage_skipped(&name, "output exists, skipped");
            if self.record.stage(&name).is_none() {
                self.set(stage, 0.0, StageStatus::Done)?;
            }
            return Ok(());
        }
        self.ctx.events.stage_started(&name, &stage.command());
        self.set(stage, 0.0, StageStatus::Running)?;
        let started = Instant::now();
        let outcome = stage
            .run(&self.ctx)
            .map_err(|e| e.context(format!("stage {name} failed")))?;
        self.ctx.events.stage_finished(&name, &outcome);
        self.set(stage, started.elapsed().as_secs_f64(), StageStatus::Done)
    }

    /// Runs `stage` unless its output exists or `find` finds the same computation finished in
    /// another run ([`reusable_stage`]), whose output is then copied into `dir` and recorded.
    fn stage_or_copy(
        &mut self,
        stage: &dyn Stage,
        dir: &Path,
        find: impl FnOnce() -> Result<Option<StageRecord>>,
    ) -> Result<()> {
        let found = if stage.done()? { None } else { find()? };
        let Some(found) = found else {
            return self.stage(stage);
        };
        let from = found.reused_from.clone().unwrap_or_default();
        self.ctx.events.stage_skipped(
            &stage.name(),
            &format!(
                "the same computation (command and inputs) finished in {}: copied",
                from.display()
            ),
        );
        copy_stage_output(&from, dir)?;
        self.record.set_stage(StageRecord {
            command: stage.command(),
            identity: Some(stage.identity()),
            ..found
        });
        self.save()
    }
}

/// Runs (or resumes) the pipeline `settings` describe; `command` is recorded as the run's.
pub fn run(
    settings: &PipelineSettings,
    command: &str,
    device: tch::Device,
    events: &dyn RunEvents,
) -> Result<RunOutcome> {
    let started = Instant::now();
    let layout = RunLayout::new(&settings.out);
    let s = &settled(settings, &layout)?;
    let plan = Plan::check(s)?;
    std::fs::create_dir_all(&s.out).map_err(|source| PipelineError::Write {
        path: s.out.clone(),
        source,
    })?;
    let _lock = DirLock::acquire(&s.out)?;
    let mut run = Runner {
        record: open_record(s, &layout, command)?,
        layout,
        ctx: StageContext { device, events },
    };
    run.save()?;
    let proxy_teacher = run.proxy_teacher(s, &plan)?;
    run.proxy_policies(s, &plan, &proxy_teacher)?;
    let target_teacher = run.target_teacher(s)?;
    run.edmips_target(s, &plan, &target_teacher)?;
    let finetuned = run.finetunes(s, &target_teacher)?;
    let mut outcome = run.finish(s, &target_teacher, finetuned)?;
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

impl Runner<'_> {
    /// Stage 1: the FP teacher on the proxy (or the one given).
    fn proxy_teacher(&mut self, s: &PipelineSettings, plan: &Plan) -> Result<PathBuf> {
        if let Some(t) = &s.teacher {
            return Ok(t.clone());
        }
        let dir = self.layout.proxy_teacher();
        self.stage(&TrainStage {
            name: "teacher-proxy".into(),
            model: s.model.clone(),
            width: s.width,
            data: plan.proxy.clone(),
            limit: plan.proxy_limit,
            subset_seed: s.subset_seed,
            holdout: 0,
            test_limit: Some(1000),
            epochs: s.teacher_epochs,
            hflip: plan.proxy_hflip,
            seed: s.seed,
            out: dir.clone(),
            finetune: None,
        })?;
        Ok(crate::train::last_checkpoint(&dir))
    }

    /// Stage 2: the policies that need no target teacher: the searches on the proxy, uniform,
    /// random, HAWQ, uniform-fill, then the ranked GMPQ arm (it needs GMPQ's search and
    /// uniform-fill's policy).
    fn proxy_policies(
        &mut self,
        s: &PipelineSettings,
        plan: &Plan,
        proxy_teacher: &Path,
    ) -> Result<()> {
        let layout = self.layout.clone();
        let proxy_search = |arm: Arm, kind: SearchKind| SearchStage {
            name: format!("search-{}", arm.name()),
            teacher: proxy_teacher.to_path_buf(),
            data: plan.proxy.clone(),
            limit: plan.proxy_limit,
            subset_seed: s.subset_seed,
            target: plan.target,
            candidates: plan.candidates.clone(),
            hflip: plan.proxy_hflip,
            seed: s.seed,
            out: layout.search(arm),
            kind,
            // uniform-fill measures what the run's HAWQ arm measured: reuse it when it ran.
            sensitivities_from: (arm == Arm::UniformFill).then(|| layout.policy(Arm::Hawq)),
        };
        let all_arms = self.record.arms.clone();
        for &arm in all_arms
            .iter()
            .filter(|a| !matches!(a, Arm::EdmipsTarget | Arm::GmpqRanked))
        {
            let kind = match arm {
                Arm::Uniform => SearchKind::Uniform,
                Arm::Random => SearchKind::Random,
                Arm::Hawq => SearchKind::Hawq,
                Arm::UniformFill => SearchKind::UniformFill,
                Arm::Edmips => supernet(s, 0.0, s.search_epochs),
                _ => {
                    let mut kind = supernet(s, s.attribution_weight, s.search_epochs);
                    if let SearchKind::Supernet { p, .. } = &mut kind {
                        *p = s.p;
                    }
                    kind
                }
            };
            self.stage(&proxy_search(arm, kind))?;
        }
        if all_arms.contains(&Arm::GmpqRanked) {
            self.stage(&RankStage {
                name: format!("search-{}", Arm::GmpqRanked.name()),
                searched: layout.policy(Arm::Gmpq),
                teacher: proxy_teacher.to_path_buf(),
                data: plan.proxy.clone(),
                limit: plan.proxy_limit,
                subset_seed: s.subset_seed,
                target: plan.target,
                extra: all_arms
                    .contains(&Arm::UniformFill)
                    .then(|| layout.policy(Arm::UniformFill))
                    .into_iter()
                    .collect(),
                out: layout.search(Arm::GmpqRanked),
            })?;
        }
        Ok(())
    }

    /// Stage 3: the FP teacher on the target (or the one given).
    fn target_teacher(&mut self, s: &PipelineSettings) -> Result<PathBuf> {
        if let Some(t) = &s.target_teacher {
            return Ok(t.clone());
        }
        let dir = self.layout.target_teacher();
        self.stage(&TrainStage {
            name: "teacher-target".into(),
            model: s.model.clone(),
            width: s.width,
            data: s.target.clone(),
            limit: s.target_limit,
            subset_seed: 0,
            holdout: s.target_holdout.unwrap_or(0),
            test_limit: s.target_test_limit,
            epochs: s.target_teacher_epochs,
            hflip: s.hflip,
            seed: s.seed,
            out: dir.clone(),
            finetune: None,
        })?;
        Ok(crate::train::last_checkpoint(&dir))
    }

    /// The conventional route: EdMIPS searched on the target itself, guided by its teacher.
    /// It does not depend on the proxy, so another pair's run at this budget and seed may
    /// have done it (copied).
    fn edmips_target(
        &mut self,
        s: &PipelineSettings,
        plan: &Plan,
        target_teacher: &Path,
    ) -> Result<()> {
        if !self.record.arms.contains(&Arm::EdmipsTarget) {
            return Ok(());
        }
        let arm = Arm::EdmipsTarget;
        let target_search = |l: &RunLayout| SearchStage {
            name: format!("search-{}", arm.name()),
            teacher: target_teacher.to_path_buf(),
            data: s.target.clone(),
            limit: s.target_limit,
            subset_seed: 0,
            target: plan.target,
            candidates: plan.candidates.clone(),
            hflip: s.hflip,
            seed: s.seed,
            out: l.search(arm),
            kind: supernet(s, 0.0, s.target_search_epochs.unwrap_or(s.search_epochs)),
            sensitivities_from: None,
        };
        let layout = self.layout.clone();
        let stage = target_search(&layout);
        self.stage_or_copy(&stage, &layout.search(arm), || {
            reusable_stage(
                &layout,
                &s.reuse_from,
                &stage.name(),
                |l| StageKey::of(&target_search(l)),
                |l| l.search(arm),
                |l| target_search(l).done(),
            )
        })
    }

    /// Stage 4: every arm's policy fine-tuned on the target (evaluated on its test split each
    /// epoch); a fine-tuning another arm of this run, or the same run elsewhere, already did
    /// is copied. Returns the fine-tuned checkpoints, in arm order.
    fn finetunes(&mut self, s: &PipelineSettings, target_teacher: &Path) -> Result<Vec<PathBuf>> {
        let finetune = |l: &RunLayout, arm: Arm| TrainStage {
            name: format!("finetune-{}", arm.name()),
            model: s.model.clone(),
            width: s.width,
            data: s.target.clone(),
            limit: s.target_limit,
            subset_seed: 0,
            holdout: s.target_holdout.unwrap_or(0),
            test_limit: s.target_test_limit,
            epochs: s.finetune_epochs,
            hflip: s.hflip,
            seed: s.seed,
            out: l.finetune(arm),
            finetune: Some(FinetuneOf {
                init: target_teacher.to_path_buf(),
                policy: l.policy(arm),
                lr: s.finetune_lr,
                numerics: s.numerics.unwrap_or_default(),
            }),
        };
        let layout = self.layout.clone();
        let (mut finetuned, mut finetuned_arms) = (Vec::new(), Vec::new());
        for arm in self.record.arms.clone() {
            let stage = finetune(&layout, arm);
            let dir = layout.finetune(arm);
            self.stage_or_copy(&stage, &dir, || {
                let ours = same_policy_training(
                    &layout,
                    &finetuned_arms,
                    arm,
                    &stage.name(),
                    s.finetune_epochs,
                )?;
                match ours {
                    Some(found) => Ok(Some(found)),
                    None => reusable_training(
                        &layout,
                        &s.reuse_from,
                        arm,
                        &stage.name(),
                        s.finetune_epochs,
                        |l| StageKey::of(&finetune(l, arm)),
                    ),
                }
            })?;
            finetuned_arms.push(arm);
            finetuned.push(crate::train::last_checkpoint(&dir));
        }
        Ok(finetuned)
    }

    /// Stage 5: attribution of teacher and students on target images, the summary (with a warning
    /// for an arm at chance), the chosen model's export, the report.
    fn finish(
        &mut self,
        s: &PipelineSettings,
        target_teacher: &Path,
        finetuned: Vec<PathBuf>,
    ) -> Result<RunOutcome> {
        let layout = self.layout.clone();
        let mut checkpoints = vec![target_teacher.to_path_buf()];
        checkpoints.extend(finetuned);
        self.stage(&AttributionStage {
            checkpoints,
            data: s.target.clone(),
            count: 6,
            out: layout.target_attribution(),
        })?;
        // Every arm's predictions on the validation images: the choice weighs the best arm
        // against the simplest policy on the same images.
        if s.target_holdout.unwrap_or(0) > 0 {
            let arms: Vec<(Arm, PathBuf)> = self
                .record
                .arms
                .iter()
                .map(|&a| (a, crate::train::last_checkpoint(&layout.finetune(a))))
                .filter(|(_, ck)| ck.is_file())
                .collect();
            self.stage(&ValidateStage {
                arms,
                data: s.target.clone(),
                holdout: s.target_holdout.unwrap_or(0),
                out: layout.validation(),
            })?;
        }
        let mut summary = RunSummary::collect(&layout, &self.record.arms)?;
        warn_at_chance(&summary);
        if let Some(w) = summary.choice.as_ref().and_then(|c| c.warning.as_ref()) {
            tracing::warn!("{w}");
        }
        // The chosen model is what a user ships: export it.
        if let Some(arm) = summary.chosen {
            self.stage(&ExportStage {
                arm,
                checkpoint: crate::train::last_checkpoint(&layout.finetune(arm)),
                layout_dir: layout.dir.clone(),
                data: s.target.clone(),
                test_limit: s.target_test_limit,
            })?;
        }
        // With the shipped file's own scores.
        summary.read_shipped(&layout);
        let bytes = serde_json::to_vec_pretty(&summary)
            .map_err(|e| PipelineError::Invalid(format!("summary: {e}")))?;
        crate::files::write_atomic(&layout.summary(), &bytes).map_err(|source| {
            PipelineError::Write {
                path: layout.summary(),
                source,
            }
        })?;
        let report = super::write_run_report(&s.out)?;
        Ok(RunOutcome {
            summary,
            report,
            seconds: 0.0,
        })
    }
}

/// A policy that does not learn with this recipe is a finding, not a result to ship: said
/// where the run is watched (the tables keep it; the choice passes it over).
fn warn_at_chance(summary: &RunSummary) {
    let Some(model) = &summary.model else {
        return;
    };
    let chance = 100.0 / model.num_classes.max(1) as f64;
    for a in &summary.arms {
        if let Some(top1) = a.top1.filter(|t| *t < 1.5 * chance) {
            tracing::warn!(
                "{}: fine-tuned to {top1:.2}% test top-1 (chance {chance:.2}%): its policy \
                 does not learn with this recipe",
                a.arm.name()
            );
        }
    }
}
