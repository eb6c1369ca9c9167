//! A whole run (teachers → policies → fine-tuning → report) from [`PipelineSettings`]: every
//! input checked before anything is created, each stage recorded in `pipeline.json` with its
//! command and skipped when its output exists, so an interrupted run resumes.

use super::settings::split_subset;
use super::stage::{
    AttributionStage, ExportStage, FinetuneOf, RankStage, SearchKind, SearchStage, Stage,
    StageContext, TrainStage,
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
use crate::quant::Numerics;
use crate::search::{Geometry, SearchProgress};
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
    let resolved = PipelineSettings {
        numerics: Some(match settings.numerics {
            Some(n) => n,
            None => match RunRecord::load(&layout.record())? {
                Some(r) => r
                    .settings
                    .get("numerics")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or(Numerics::FakeQuant),
                None => Numerics::Integer,
            },
        }),
        ..settings.clone()
    };
    let s = &resolved;
    let target = s.budget()?;
    let arms = s.arms();
    // Every input is checked before stage 1 (nothing is created for a run that cannot start).
    let (proxy, proxy_limit) = split_subset(&s.proxy);
    check_data("--proxy", &proxy)?;
    let target_train = check_data("--target", &split_subset(&s.target).0)?;
    let candidates = s.candidates()?;
    if let Some(t) = &s.teacher {
        check_teacher(t, &s.model, "--teacher")?;
    }
    // An unreachable budget is refused here, not after the teachers have trained.
    let model = target_model(
        &s.model,
        s.width,
        s.target_teacher.as_deref(),
        target_train.as_ref(),
    )?;
    crate::search::check_feasible(&budget_geometry(&model)?, &target, &candidates)
        .map_err(crate::search::SearchError::from)?;

    std::fs::create_dir_all(&s.out).map_err(|source| PipelineError::Write {
        path: s.out.clone(),
        source,
    })?;
    let _lock = DirLock::acquire(&s.out)?;
    let recorded = s.record();
    let record = match RunRecord::load(&layout.record())? {
        Some(mut r) => {
            r.check_settings(&s.out, &recorded)?;
            for arm in &arms {
                if !r.arms.contains(arm) {
                    r.arms.push(*arm);
                }
            }
            r.command = command.into();
            r
        }
        None => {
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
            RunRecord {
                format: RECORD_FORMAT,
                command: command.into(),
                settings: recorded,
                arms: arms.clone(),
                stages: Vec::new(),
            }
        }
    };
    let all_arms = record.arms.clone();
    let mut run = Runner {
        layout: layout.clone(),
        record,
        ctx: StageContext { device, events },
    };
    run.save()?;
    // The proxy may be data that must not be flipped (digits) while the target is flipped.
    let proxy_hflip = s.proxy_hflip.unwrap_or(s.hflip);

    // 1. FP teacher on the proxy.
    let proxy_teacher = match &s.teacher {
        Some(t) => t.clone(),
        None => {
            let dir = layout.proxy_teacher();
            run.stage(&TrainStage {
                name: "teacher-proxy".into(),
                model: s.model.clone(),
                width: s.width,
                data: proxy.clone(),
                limit: proxy_limit,
                subset_seed: s.subset_seed,
                holdout: 0,
                test_limit: Some(1000),
                epochs: s.teacher_epochs,
                hflip: proxy_hflip,
                seed: s.seed,
                out: dir.clone(),
                finetune: None,
            })?;
            crate::train::last_checkpoint(&dir)
        }
    };

    // 2. Policies that need no target teacher: searches on the proxy, uniform, random, HAWQ.
    let proxy_search = |arm: Arm, kind: SearchKind| SearchStage {
        name: format!("search-{}", arm.name()),
        teacher: proxy_teacher.clone(),
        data: proxy.clone(),
        limit: proxy_limit,
        subset_seed: s.subset_seed,
        target,
        candidates: candidates.clone(),
        hflip: proxy_hflip,
        seed: s.seed,
        out: layout.search(arm),
        kind,
        // uniform-fill measures what the run's HAWQ arm measured: reuse it when it ran.
        sensitivities_from: (arm == Arm::UniformFill).then(|| layout.policy(Arm::Hawq)),
    };
    let supernet = |attribution_weight: f64, epochs: usize| SearchKind::Supernet {
        attribution_weight,
        epochs,
        step_epochs: s.search_step_epochs,
        recipe: s.recipe,
        p: None,
    };
    // The ranked GMPQ arm needs GMPQ's search (and uniform-fill's policy): it comes after.
    for &arm in all_arms
        .iter()
        .filter(|a| !matches!(a, Arm::EdmipsTarget | Arm::GmpqRanked))
    {
        match arm {
            Arm::Uniform => run.stage(&proxy_search(arm, SearchKind::Uniform))?,
            Arm::Random => run.stage(&proxy_search(arm, SearchKind::Random))?,
            Arm::Hawq => run.stage(&proxy_search(arm, SearchKind::Hawq))?,
            Arm::UniformFill => run.stage(&proxy_search(arm, SearchKind::UniformFill))?,
            Arm::Edmips => run.stage(&proxy_search(arm, supernet(0.0, s.search_epochs)))?,
            _ => {
                let mut kind = supernet(s.attribution_weight, s.search_epochs);
                if let SearchKind::Supernet { p, .. } = &mut kind {
                    *p = s.p;
                }
                run.stage(&proxy_search(arm, kind))?
            }
        }
    }

    if all_arms.contains(&Arm::GmpqRanked) {
        run.stage(&RankStage {
            name: format!("search-{}", Arm::GmpqRanked.name()),
            searched: layout.policy(Arm::Gmpq),
            teacher: proxy_teacher.clone(),
            data: proxy.clone(),
            limit: proxy_limit,
            subset_seed: s.subset_seed,
            target,
            extra: all_arms
                .contains(&Arm::UniformFill)
                .then(|| layout.policy(Arm::UniformFill))
                .into_iter()
                .collect(),
            out: layout.search(Arm::GmpqRanked),
        })?;
    }

    // 3. FP teacher on the target.
    let target_teacher = match &s.target_teacher {
        Some(t) => t.clone(),
        None => {
            let dir = layout.target_teacher();
            run.stage(&TrainStage {
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
            crate::train::last_checkpoint(&dir)
        }
    };

    // The conventional route: EdMIPS searched on the target itself, guided by its teacher. It
    // does not depend on the proxy, so another pair's run at this budget and seed has done it.
    if all_arms.contains(&Arm::EdmipsTarget) {
        let arm = Arm::EdmipsTarget;
        let target_search = |l: &RunLayout| SearchStage {
            name: format!("search-{}", arm.name()),
            teacher: target_teacher.clone(),
            data: s.target.clone(),
            limit: s.target_limit,
            subset_seed: 0,
            target,
            candidates: candidates.clone(),
            hflip: s.hflip,
            seed: s.seed,
            out: l.search(arm),
            kind: supernet(0.0, s.target_search_epochs.unwrap_or(s.search_epochs)),
            sensitivities_from: None,
        };
        let stage = target_search(&layout);
        run.stage_or_copy(&stage, &layout.search(arm), || {
            reusable_stage(
                &layout,
                &s.reuse_from,
                &stage.name(),
                |l| StageKey::of(&target_search(l)),
                |l| l.search(arm),
                |l| target_search(l).done(),
            )
        })?;
    }

    // 4. Fine-tune every arm's policy on the target (evaluated on its test split each epoch).
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
            init: target_teacher.clone(),
            policy: l.policy(arm),
            lr: s.finetune_lr,
            numerics: s.numerics.unwrap_or_default(),
        }),
    };
    let (mut finetuned, mut finetuned_arms) = (Vec::new(), Vec::new());
    for &arm in &all_arms {
        let stage = finetune(&layout, arm);
        let dir = layout.finetune(arm);
        run.stage_or_copy(&stage, &dir, || {
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

    // 5. Attribution of teacher and students on target images, summary, report.
    let mut checkpoints = vec![target_teacher.clone()];
    checkpoints.extend(finetuned);
    run.stage(&AttributionStage {
        checkpoints,
        data: s.target.clone(),
        count: 6,
        out: layout.target_attribution(),
    })?;
    let summary = RunSummary::collect(&layout, &all_arms)?;
    // A policy that does not learn with this recipe is a finding, not a result to ship: say
    // so where the run is watched (the tables keep it; the choice passes it over).
    if let Some(model) = &summary.model {
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
    // The chosen model is what a user ships: export it.
    if let Some(arm) = summary.chosen {
        run.stage(&ExportStage {
            arm,
            checkpoint: crate::train::last_checkpoint(&layout.finetune(arm)),
            layout_dir: layout.dir.clone(),
        })?;
    }
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
        seconds: started.elapsed().as_secs_f64(),
    })
}
