//! Running a study: shared teachers, then one pipeline per (pair, budget, seed), then the
//! results tables. Every step resumes, and several processes may share one output folder,
//! each taking the runs the others are not working on.

use super::{
    aggregate, collect, mean_bits, paired_differences, write_results, MeanBits, StudyConfig,
    StudyError, StudyRun, TeacherConfig,
};
use crate::pipeline::{
    budget_geometry, check_data, split_subset, target_model, Arm, PipelineError, PipelineSettings,
    RunEvents, RunLayout, Stage, StageContext, TrainStage,
};
use crate::policy::{Candidates, DEFAULT_CANDIDATES};
use crate::report::Bars;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, StudyError>;

/// Trains (or resumes, or skips) a shared FP teacher; returns its checkpoint.
fn teacher(
    config: &StudyConfig,
    t: &TeacherConfig,
    holdout: usize,
    dir: &Path,
    ctx: &StageContext,
) -> Result<PathBuf> {
    let (data, limit) = split_subset(&t.data);
    let stage = TrainStage {
        name: "teacher".into(),
        model: config.model.clone(),
        width: config.width,
        data,
        limit,
        subset_seed: 0,
        holdout,
        test_limit: None,
        epochs: t.epochs,
        hflip: t.hflip,
        seed: 0,
        out: dir.into(),
        finetune: None,
    };
    // Several processes (a job array's tasks) may need the same teacher: one trains it, the
    // others wait for its folder lock (released when it finishes or dies) and then find it done.
    let mut waiting = false;
    loop {
        if stage.done()? {
            ctx.events
                .message(&format!("[study] teacher {} done, skipped", dir.display()));
            break;
        }
        ctx.events.message(&format!("[study] {}", stage.command()));
        match stage.run(ctx) {
            Ok(outcome) => {
                ctx.events.message(&format!("[study] {outcome}"));
                break;
            }
            Err(e) if e.busy_folder().is_some() => {
                if !waiting {
                    ctx.events.message(&format!(
                        "[study] {e}: waiting for the teacher another process is training"
                    ));
                    waiting = true;
                }
                std::thread::sleep(TEACHER_POLL);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(crate::train::last_checkpoint(dir))
}

/// How often a process waiting for a shared teacher looks again.
const TEACHER_POLL: std::time::Duration = std::time::Duration::from_secs(10);

/// The run a job-array task takes: `SLURM_ARRAY_TASK_ID` (Slurm), else
/// `JOB_COMPLETION_INDEX` (a Kubernetes indexed Job); `None` when neither is set.
pub fn array_index_from_env() -> Result<Option<usize>> {
    for var in ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"] {
        if let Ok(v) = std::env::var(var) {
            return v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| StudyError::Invalid(format!("{var}={v:?} is not a run index")));
        }
    }
    Ok(None)
}

/// Every data set and budget of the study (of the pairs it runs; all when `pairs` is empty) is
/// checked before any teacher trains: a typo in the last pair's path must not surface hours in.
pub fn check_inputs(config: &StudyConfig, pairs: &[String]) -> Result<()> {
    let (target_data, _) = split_subset(&config.target.data);
    let target = check_data("the study's target", &target_data)?;
    let model = target_model(&config.model, config.width, None, target.as_ref())?;
    let geometry = budget_geometry(&model)?;
    // The candidates every run of the study searches (its pipelines' defaults).
    let candidates = Candidates::new(&DEFAULT_CANDIDATES, &DEFAULT_CANDIDATES)?;
    for p in config
        .pairs
        .iter()
        .filter(|p| pairs.is_empty() || pairs.contains(&p.name))
    {
        let (proxy, _) = split_subset(&p.proxy.data);
        check_data(&format!("pair {}: proxy", p.name), &proxy)?;
        for b in &p.budgets {
            let budget = crate::search::Target::Compression(b.compression);
            crate::search::check_feasible(&geometry, &budget, &candidates).map_err(|e| {
                PipelineError::from(crate::search::SearchError::from(e))
                    .context(format!("pair {}", p.name))
            })?;
        }
    }
    Ok(())
}

/// The settings of one run of the study: the demo's recipe with the study's teachers, budget,
/// epochs and seed.
fn run_settings(
    config: &StudyConfig,
    run: &StudyRun,
    runs: &[StudyRun],
    proxy_teacher: PathBuf,
    target_teacher: PathBuf,
) -> Result<PipelineSettings> {
    let pair = config
        .pairs
        .iter()
        .find(|p| p.name == run.pair)
        .ok_or_else(|| StudyError::Invalid(format!("no pair {}", run.pair)))?;
    Ok(PipelineSettings {
        model: config.model.clone(),
        width: config.width,
        proxy: pair.proxy.data.clone(),
        target: config.target.data.clone(),
        budget: crate::search::BudgetArgs {
            target_compression: Some(run.compression),
            ..Default::default()
        },
        target_holdout: Some(config.holdout.unwrap_or(0)),
        numerics: Some(config.numerics),
        teacher: Some(proxy_teacher),
        target_teacher: Some(target_teacher),
        baseline: config
            .arms
            .iter()
            .copied()
            .filter(|a| *a != Arm::Gmpq)
            .collect(),
        search_epochs: config.search_epochs,
        target_search_epochs: Some(config.target_search_epochs),
        search_step_epochs: (config.search_epochs * 2 / 5).max(1),
        finetune_epochs: config.finetune_epochs,
        hflip: config.hflip,
        proxy_hflip: Some(pair.proxy.hflip),
        seed: run.seed,
        // Proxy-independent stages of another pair at this budget and seed (the target search,
        // the fine-tunings of uniform, random and edmips-target) are the same computation.
        reuse_from: runs
            .iter()
            .filter(|o| o.seed == run.seed && o.dir != run.dir)
            .map(|o| o.dir.clone())
            .collect(),
        ..PipelineSettings::demo(run.dir.clone())
    })
}

/// Runs (or resumes) the study `config` into `out`, the pairs named in `pairs` (all when
/// empty); `command` is recorded in each run. Returns the results page.
pub fn run(
    config: &StudyConfig,
    out: &Path,
    pairs: &[String],
    command: &str,
    device: tch::Device,
    events: &dyn RunEvents,
) -> Result<PathBuf> {
    run_selected(config, out, pairs, None, command, device, events)
}

/// [`run`], or with `only = Some(i)` just the study's run `i` (0-based, in the order of
/// [`StudyConfig::runs`]) and the teachers it needs: one task of a job array. A run another
/// process holds (a duplicated or requeued task) is left to it.
pub fn run_selected(
    config: &StudyConfig,
    out: &Path,
    pairs: &[String],
    only: Option<usize>,
    command: &str,
    device: tch::Device,
    events: &dyn RunEvents,
) -> Result<PathBuf> {
    let count = config.runs(out).len();
    if let Some(i) = only.filter(|&i| i >= count) {
        return Err(StudyError::Invalid(format!(
            "run index {i}: the study has {count} runs (0–{})",
            count.saturating_sub(1)
        )));
    }
    if let Some(unknown) = pairs
        .iter()
        .find(|n| !config.pairs.iter().any(|p| &p.name == *n))
    {
        let known: Vec<&str> = config.pairs.iter().map(|p| p.name.as_str()).collect();
        return Err(StudyError::Invalid(format!(
            "--pair {unknown}: the study has no such pair ({})",
            known.join(", ")
        )));
    }
    check_inputs(config, pairs)?;
    keep_config(config, out)?;
    let ctx = StageContext { device, events };
    let target_teacher = teacher(
        config,
        &config.target,
        config.holdout.unwrap_or(0),
        &out.join("teacher-target"),
        &ctx,
    )?;
    let runs = config.runs(out);
    // Runs another study process is working on (same out): it owns them, this one moves on.
    let mut held = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        if (!pairs.is_empty() && !pairs.contains(&r.pair)) || only.is_some_and(|o| o != i) {
            continue;
        }
        let proxy = config
            .pairs
            .iter()
            .find(|p| p.name == r.pair)
            .ok_or_else(|| StudyError::Invalid(format!("no pair {}", r.pair)))?;
        let proxy_teacher = teacher(
            config,
            &proxy.proxy,
            0,
            &out.join(format!("teacher-{}", proxy.name)),
            &ctx,
        )?;
        if r.finished(&config.arms, config.finetune_epochs)? {
            events.message(&format!(
                "[study] run {}/{} ({}) finished, skipped",
                i + 1,
                runs.len(),
                r.dir.display()
            ));
            continue;
        }
        events.message(&format!(
            "[study] run {}/{}: {} at compression {}, seed {} → {}",
            i + 1,
            runs.len(),
            r.pair,
            r.compression,
            r.seed,
            r.dir.display()
        ));
        let settings = run_settings(config, r, &runs, proxy_teacher, target_teacher.clone())?;
        match crate::pipeline::run(&settings, command, device, events) {
            Ok(_) => {}
            Err(e) if e.busy_folder() == Some(r.dir.as_path()) => {
                events.message(&format!("[study] {e}: skipping this run"));
                held.push(r.dir.display().to_string());
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        write_tables(config, out, &runs)?;
    }
    let page = write_tables(config, out, &runs)?;
    if !held.is_empty() {
        events.message(&format!(
            "[study] {} run(s) belonged to another process: {}. When it ends, run the study \
             again (or with --tables-only) for complete tables.",
            held.len(),
            held.join(", ")
        ));
    }
    Ok(page)
}

/// The config a study started with stays beside its results; another config is refused.
fn keep_config(config: &StudyConfig, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| StudyError::Write {
        path: out.into(),
        source,
    })?;
    if check_config(config, out)? == SavedConfig::Same {
        return Ok(());
    }
    let saved = out.join(CONFIG_FILE);
    let bytes = serde_json::to_vec_pretty(config)
        .map_err(|e| StudyError::Invalid(format!("study config: {e}")))?;
    crate::files::write_atomic(&saved, &bytes).map_err(|source| StudyError::Write {
        path: saved,
        source,
    })
}

/// Where a study keeps the configuration it started with.
const CONFIG_FILE: &str = "study.json";

/// What a study folder holds, against a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SavedConfig {
    /// No study.
    None,
    /// A study started with this configuration.
    Same,
    /// A study started with this configuration less some arms: they are added (every run
    /// keeps what it has and runs the new arms).
    Grown,
}

/// What `out` holds against `config`; any other change than added arms is refused, naming it.
fn check_config(config: &StudyConfig, out: &Path) -> Result<SavedConfig> {
    let saved = out.join(CONFIG_FILE);
    let Ok(text) = std::fs::read_to_string(&saved) else {
        return Ok(SavedConfig::None);
    };
    let old: StudyConfig = serde_json::from_str(&text).map_err(|e| StudyError::Config {
        path: saved.clone(),
        reason: e.to_string(),
    })?;
    if &old == config {
        return Ok(SavedConfig::Same);
    }
    let same_but_arms = StudyConfig {
        arms: config.arms.clone(),
        ..old.clone()
    } == *config;
    if same_but_arms && old.arms.iter().all(|a| config.arms.contains(a)) {
        return Ok(SavedConfig::Grown);
    }
    Err(StudyError::Invalid(format!(
        "{} was started with another configuration ({}: {}); only arms may be added; use \
         another --out",
        out.display(),
        saved.display(),
        crate::fields::changed_fields(&old, config)
    )))
}

/// Rewrites the tables of the study `config` in `out` from its runs' records, running nothing.
pub fn tables_only(config: &StudyConfig, out: &Path) -> Result<PathBuf> {
    if check_config(config, out)? == SavedConfig::None {
        return Err(StudyError::Invalid(format!(
            "{} holds no study (no {CONFIG_FILE})",
            out.display()
        )));
    }
    write_tables(config, out, &config.runs(out))
}

/// Mean bits per layer of the searched arms, side by side, one weights and one activations
/// chart per (pair, budget), appended to the page.
pub(super) fn bits_charts(
    config: &StudyConfig,
    out: &Path,
    runs: &[StudyRun],
    page: &mut String,
) -> Result<()> {
    let searched: Vec<Arm> = [
        Arm::Gmpq,
        Arm::Edmips,
        Arm::Hawq,
        Arm::UniformFill,
        Arm::EdmipsTarget,
    ]
    .into_iter()
    .filter(|a| config.arms.contains(a))
    .collect();
    let means = mean_bits(runs, &searched)?;
    let mut groups: Vec<(String, f64)> = means
        .iter()
        .map(|m| (m.pair.clone(), m.compression_target))
        .collect();
    groups.dedup();
    if !groups.is_empty() {
        page.push_str("<h2>Bits per layer (mean over seeds)</h2>");
    }
    for (pair, budget) in groups {
        let _ = write!(page, "<h3>{pair}, {budget}×</h3><div>");
        let group: Vec<&MeanBits> = means
            .iter()
            .filter(|m| m.pair == pair && m.compression_target == budget)
            .collect();
        for (kind, short) in [("weight", "w"), ("activation", "a")] {
            let bars: Vec<Bars> = group
                .iter()
                .map(|m| Bars {
                    label: format!("{} ({} runs)", m.arm.label(), m.runs),
                    values: if short == "w" { &m.w_bits } else { &m.a_bits }.clone(),
                    colour: match m.arm {
                        Arm::Gmpq => (0, 90, 200, 0.85),
                        Arm::Edmips => (210, 40, 40, 0.85),
                        Arm::Hawq => (230, 140, 0, 0.85),
                        Arm::UniformFill => (120, 60, 160, 0.85),
                        _ => (40, 160, 60, 0.85),
                    },
                })
                .collect();
            let name = format!("bits-{pair}-c{budget}-{short}.svg");
            crate::report::grouped_bars_svg(
                &format!("{kind} bits per layer"),
                "bits",
                &group[0].layers,
                &bars,
                &out.join(&name),
            )?;
            let _ = write!(page, "<img src=\"{name}\" style=\"max-width:100%\">");
        }
        page.push_str("</div>");
    }
    Ok(())
}

/// Writes results.csv/json and the study's HTML page (tables, charts, every run's report).
pub fn write_tables(config: &StudyConfig, out: &Path, runs: &[StudyRun]) -> Result<PathBuf> {
    let rows = collect(runs, &config.arms, config.finetune_epochs)?;
    let stats = aggregate(&rows);
    let paired = paired_differences(&rows);
    write_results(out, &rows, &stats, &paired)?;
    let mut page = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>gmpq study</title>\
         <style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body><h1>gmpq study</h1>\
         <table><tr><th>pair</th><th>budget</th><th>arm</th><th>seeds</th><th>top-1 mean ± std</th>\
         <th>BOPs (G)</th><th>size (MB)</th><th>search s</th><th>search images</th></tr>",
    );
    for s in &stats {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}×</td><td>{}</td><td>{}</td><td>{:.2} ± {:.2}</td><td>{:.4}</td><td>{:.3}</td><td>{:.0}</td><td>{:.0}</td></tr>",
            s.pair,
            s.compression_target,
            s.arm.label(),
            s.seeds,
            s.top1_mean,
            s.top1_std,
            s.bops_mean / 1e9,
            s.size_mb_mean,
            s.search_seconds_mean,
            s.search_images_mean
        );
    }
    page.push_str("</table>");
    if !paired.is_empty() {
        page.push_str(
            "<h2>Paired by seed: lead minus arm</h2><table><tr><th>pair</th><th>budget</th>\
             <th>lead</th><th>minus</th><th>mean difference</th><th>lead ahead</th><th>per seed</th></tr>",
        );
        for d in &paired {
            let seeds: Vec<String> = d
                .per_seed
                .iter()
                .map(|(s, v)| format!("{s}: {v:+.2}"))
                .collect();
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}×</td><td>{}</td><td>{}</td><td>{:+.2}</td><td>{} of {}</td><td>{}</td></tr>",
                d.pair,
                d.compression_target,
                d.lead.label(),
                d.against.label(),
                d.mean,
                d.ahead,
                d.per_seed.len(),
                seeds.join(", ")
            );
        }
        page.push_str("</table>");
    }
    bits_charts(config, out, runs, &mut page)?;
    page.push_str("<h2>Runs</h2><ul>");
    for r in runs {
        let report = RunLayout::new(&r.dir).report();
        if report.exists() {
            let rel = report.strip_prefix(out).unwrap_or(&report);
            let _ = write!(
                page,
                "<li><a href=\"{}\">{}</a></li>",
                rel.display(),
                rel.display()
            );
        }
    }
    page.push_str("</ul></body></html>\n");
    let path = out.join("study.html");
    crate::files::write_atomic(&path, page.as_bytes()).map_err(|source| StudyError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
