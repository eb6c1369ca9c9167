//! What a run settles before its stages: the settings it resumes with, the arms and checks
//! it plans, and its record, opened or continued.

use super::search_stage::SearchKind;
use super::settings::split_subset;
use super::{
    context, PipelineError, PipelineSettings, Result, RunLayout, RunRecord, RECORD_FILE,
    RECORD_FORMAT,
};
use crate::checkpoint::Checkpoint;
use crate::data::{DatasetSpec, ImageSource, Split};
use crate::files::LOCK_FILE;
use crate::model::{Arch, ModelConfig};
use crate::policy::Candidates;
use crate::quant::Numerics;
use crate::search::{Geometry, Target};
use std::path::Path;
use std::sync::Arc;

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

/// `settings` with their numerics and validation split settled: as given, as the run
/// recorded them (runs from before integer numerics are fake-quant; runs from before the
/// validation split hold none out), or for a new run integer numerics and
/// [`super::target_holdout_for`] the target's training images.
pub(super) fn settled(settings: &PipelineSettings, layout: &RunLayout) -> Result<PipelineSettings> {
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
pub(super) struct Plan {
    pub(super) target: Target,
    /// The proxy data and the size of its subset.
    pub(super) proxy: String,
    pub(super) proxy_limit: Option<usize>,
    pub(super) candidates: Candidates,
    /// The proxy may be data that must not be flipped (digits) while the target is flipped.
    pub(super) proxy_hflip: bool,
}

impl Plan {
    /// Checks every input before stage 1, so nothing is created for a run that cannot start;
    /// an unreachable budget is refused here, not after the teachers have trained.
    pub(super) fn check(s: &PipelineSettings) -> Result<Self> {
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
pub(super) fn open_record(
    s: &PipelineSettings,
    layout: &RunLayout,
    command: &str,
) -> Result<RunRecord> {
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
pub(super) fn supernet(s: &PipelineSettings, attribution_weight: f64, epochs: usize) -> SearchKind {
    SearchKind::Supernet {
        attribution_weight,
        epochs,
        step_epochs: s.search_step_epochs,
        recipe: s.recipe,
        p: None,
    }
}
