//! A whole run (teachers → policies → fine-tuning → report) from [`PipelineSettings`]: every
//! input checked before anything is created, each stage recorded in `pipeline.json` with its
//! command and skipped when its output exists, so an interrupted run resumes.

use super::choice::ValidateStage;
use super::settings::split_subset;
use super::ship::ExportStage;
use super::stage::{
    AttributionStage, FinetuneOf, RankStage, SearchKind, SearchStage, Stage, StageContext,
    TrainStage,
};
use super::{
    context, copy_stage_output, reusable_stage, reusable_training, same_policy_training, Arm,
    PipelineError, PipelineSettings, Result, RunLayout, RunRecord, RunSummary, StageKey,
    StageRecord, StageStatus, RECORD_FILE, RECORD_FORMAT,
};
use crate::checkpoint::Checkpoint;
use crate::data::{DatasetSpec, ImageSource, Split};
use crate::files::{DirLock, LOCK_FILE};
use crate::model::{Arch, ModelConfig};
use crate::policy::Candidates;
use crate::quant::Numerics;
use crate::search::{Geometry, SearchProgress, Target};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What a run tells its caller as it goes (the CLI prints it and draws progress bars).
pub trait RunEvents {
    /// A stage starts; `command` is its equivalent command line.
    fn stage_started(&self, _name: &str, _command: &str) {}
    /// A stage's output exists, or was copied from another run (`why`).
    fn stage_skipped(&self, _name: &str, _why: &str) {}
    /// A stage finished; `outcome` says what it produced.
    fn stage_finished(&self, _name: &str, _outcome: &str) {}
    /// A line about the work around the stages (a study's progress through its runs).
    fn message(&self, _line: &str) {}
    fn train_progress(&self) -> &dyn crate::train::Progress {
        &crate::train::Silent
    }
    fn search_progress(&self) -> &dyn SearchProgress {
        &crate::search::Quiet
    }
}

/// A finished run: its summary (also in `summary.json`) and its HTML report.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub summary: RunSummary,
    pub report: PathBuf,
    pub seconds: f64,
}

/// Parses and opens both splits of the data given as `what`, before any work starts; returns
/// the train split, for checks that need its shape or classes.
pub fn check_data(what: &str, spec: &str) -> Result<Arc<dyn ImageSource>> {
    let wrap = || format!("{what} {spec}");
    let parsed: DatasetSpec = spec.parse().map_err(context(wrap()))?;
    let train = parsed.load(Split::Train).map_err(context(wrap()))?;
    parsed.load(Split::Test).map_err(context(wrap()))?;
    Ok(train)
}

/// Checks a given teacher: full precision and the run's architecture.
fn check_teacher(path: &Path, model: &str, what: &str) -> Result<ModelConfig> {
    let ck =
        Checkpoint::load(path).map_err(context(format!("loading {what} {}", path.display())))?;
    let arch: Arch = model.parse()?;
    if ck.meta.model.arch != arch {
        return Err(PipelineError::Invalid(format!(
            "{what} {} is a {} but --model is {arch}",
            path.display(),
            ck.meta.model.arch
        )));
    }
    if ck.meta.precision.is_some() {
        return Err(PipelineError::Invalid(format!(
            "{what} {} is quantized; give a full-precision checkpoint",
            path.display()
        )));
    }
    Ok(ck.meta.model)
}

/// The network a run fine-tunes: the given target teacher's, or the one a teacher trained on
/// the target's train split gets (its native channels and size, its classes).
pub fn target_model(
    model: &str,
    width: f64,
    target_teacher: Option<&Path>,
    target_train: &dyn ImageSource,
) -> Result<ModelConfig> {
    if let Some(t) = target_teacher {
        let cfg = check_teacher(t, model, "--target-teacher")?;
        if cfg.width != width {
            return Err(PipelineError::Invalid(format!(
                "--target-teacher {} has width {} but --width is {width}",
                t.display(),
                cfg.width
            )));
        }
        return Ok(cfg);
    }
    let [channels, size, _] = target_train.shape()?;
    let mut cfg = ModelConfig::new(model.parse()?, channels, target_train.num_classes(), size);
    cfg.width = width;
    Ok(cfg)
}

/// The geometry budgets of `model` are measured on.
pub fn budget_geometry(model: &ModelConfig) -> Result<Geometry> {
    let (_, net) = crate::train::build_fp(model, tch::Device::Cpu)?;
    Ok(Geometry::new(net.convs(), net.fc_spec()))
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

/// `settings` with their numerics and validation split settled: as given, as the run
/// recorded them (runs from before integer numerics are fake-quant; runs from before the
/// validation split hold none out), or for a new run integer numerics and
/// [`super::target_holdout_for`] the target's training images.
fn settled(settings: &PipelineSettings, layout: &RunLayout) -> Result<PipelineSettings> {
    let recorded = RunRecord::load(&layout.record())?;
    let recorded_value = |key: &str| {
        recorded
            .as_ref()
            .map(|r| r.settings.get(key).cloned().unwrap_or_default())
    };
    let numerics = match settings.numerics {
        Some(n) => n,
        None => match recorded_value("numerics") {
            Some(v) => serde_json::from_value(v).unwrap_or(Numerics::FakeQuant),
            None => Numerics::Integer,
        },
    };
    let target_holdout = match settings.target_holdout {
        Some(n) => n,
        None => match recorded_value("target_holdout") {
            Some(v) => serde_json::from_value(v).unwrap_or(0),
            None => {
                let spec: DatasetSpec = settings
                    .target
                    .parse()
                    .map_err(context(format!("--target {}", settings.target)))?;
                let train = spec
                    .load(Split::Train)
                    .map_err(context(format!("--target {}", settings.target)))?;
                super::target_holdout_for(train.len())
            }
        },
    };
    Ok(PipelineSettings {
        numerics: Some(numerics),
        target_holdout: Some(target_holdout),
        ..settings.clone()
    })
}

/// What every stage of a run shares, from its checked inputs.
struct Plan {
    target: Target,
    /// The proxy data and the size of its subset.
    proxy: String,
    proxy_limit: Option<usize>,
    candidates: Candidates,
    /// The proxy may be data that must not be flipped (digits) while the target is flipped.
    proxy_hflip: bool,
}

impl Plan {
    /// Checks every input before stage 1, so nothing is created for a run that cannot start;
    /// an unreachable budget is refused here, not after the teachers have trained.
    fn check(s: &PipelineSettings) -> Result<Self> {
        let target = s.budget()?;
        let (proxy, proxy_limit) = split_subset(&s.proxy);
        check_data("--proxy", &proxy)?;
        let target_train = check_data("--target", &split_subset(&s.target).0)?;
        let candidates = s.candidates()?;
        if let Some(t) = &s.teacher {
            check_teacher(t, &s.model, "--teacher")?;
        }
        let model = target_model(
            &s.model,
            s.width,
            s.target_teacher.as_deref(),
            target_train.as_ref(),
        )?;
        crate::search::check_feasible(&budget_geometry(&model)?, &target, &candidates)
            .map_err(crate::search::SearchError::from)?;
        Ok(Plan {
            target,
            proxy,
            proxy_limit,
            candidates,
            proxy_hflip: s.proxy_hflip.unwrap_or(s.hflip),
        })
    }
}

/// The run's record: the folder's own (its settings must be these; new arms are added), or a
/// new one in an empty folder.
fn open_record(s: &PipelineSettings, layout: &RunLayout, command: &str) -> Result<RunRecord> {
    let recorded = s.record();
    let arms = s.arms();
    if let Some(mut r) = RunRecord::load(&layout.record())? {
        r.check_settings(&s.out, &recorded)?;
        for arm in &arms {
            if !r.arms.contains(arm) {
                r.arms.push(*arm);
            }
        }
        r.command = command.into();
        return Ok(r);
    }
    let mut entries = std::fs::read_dir(&s.out)
        .map_err(|source| PipelineError::Write {
            path: s.out.clone(),
            source,
        })?
        .flatten();
    if entries.any(|e| e.file_name() != LOCK_FILE) {
        return Err(PipelineError::Invalid(format!(
            "{} is not empty and holds no {RECORD_FILE}: choose another --out",
            s.out.display()
        )));
    }
    Ok(RunRecord {
        format: RECORD_FORMAT,
        command: command.into(),
        settings: recorded,
        arms,
        stages: Vec::new(),
    })
}

/// The supernet search as the run's settings state it.
fn supernet(s: &PipelineSettings, attribution_weight: f64, epochs: usize) -> SearchKind {
    SearchKind::Supernet {
        attribution_weight,
        epochs,
        step_epochs: s.search_step_epochs,
        recipe: s.recipe,
        p: None,
    }
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
