//! `gmpq search` and `gmpq attribution`.

use super::{AttributionArgs, ExtractArgs, SearchArgs};
use anyhow::{bail, Context, Result};
use gmpq::search::SearchRequest;
use gmpq::search::{self, EpochLog, SearchConfig, SearchProgress, Target};
use gmpq::train::Augment;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

/// The budget of `--target-bops`, `--target-compression` or `--target-size-mb` (clap lets at
/// most one through), checked; `None` when none is given.
pub(super) fn parse_target(
    bops: Option<&str>,
    compression: Option<f64>,
    size_mb: Option<f64>,
) -> Result<Option<Target>> {
    Target::from_parts(bops, compression, size_mb).map_err(anyhow::Error::msg)
}

fn parse_pareto(s: &str) -> Result<Target> {
    if s.ends_with(['G', 'g', 'M', 'm', 'K', 'k']) {
        return Ok(Target::Bops(
            search::parse_bops(s).map_err(anyhow::Error::msg)?,
        ));
    }
    let v: f64 = s
        .parse()
        .with_context(|| format!("'{s}' is neither a ratio nor BOPs"))?;
    parse_target(None, Some(v), None)?.context("no compression target")
}

/// The search's progress bar and epoch lines.
pub(super) struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub(super) fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }

    /// Clears the bar of the last phase.
    pub(super) fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish_and_clear();
            }
        }
    }
}

impl SearchProgress for Bars {
    fn phase(&self, name: &str, epochs: usize, batches: usize) {
        let bar = ProgressBar::new((epochs * batches) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        if let Ok(mut b) = self.bar.lock() {
            if let Some(old) = b.replace(bar) {
                old.finish_and_clear();
            }
        }
    }
    fn step(&self, ce: f64, attr: f64, expected_bops: f64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.set_message(format!(
                    "CE {ce:.3} attr {attr:.4} E[BOPs] {:.3}G",
                    expected_bops / 1e9
                ));
                bar.inc(1);
            }
        }
    }
    fn epoch(&self, l: &EpochLog) {
        let line = format!(
            "epoch {:>3}: CE {:.4} L_attr {:.5} L_c {:.2} p {:.2} λ {:.2e} E[BOPs] {:.4}G argmax {:.4}G proxy top-1 {:.2}% rank corr {:.3} ({:.1}s)",
            l.epoch, l.ce, l.attribution_loss, l.complexity_loss, l.p, l.lambda,
            l.expected_bops / 1e9, l.argmax_bops / 1e9, l.argmax_proxy_top1, l.rank_correlation, l.seconds
        );
        match self.bar.lock().ok().and_then(|b| b.as_ref().cloned()) {
            Some(bar) => bar.suspend(|| tracing::info!("{line}")),
            None => tracing::info!("{line}"),
        }
    }
}

pub fn search_cmd(a: SearchArgs, device: tch::Device) -> Result<()> {
    let spec = super::commands::parse_spec(&a.data)?;

    let mut targets: Vec<Target> = parse_target(
        a.budget.target_bops.as_deref(),
        a.budget.target_compression,
        a.budget.target_size_mb,
    )?
    .into_iter()
    .collect();
    for p in &a.pareto {
        targets.push(parse_pareto(p)?);
    }
    let (method, method_weight) =
        gmpq::search::Method::from_name(&a.method, a.hawq_images, a.hawq_samples)?;
    let config = search_config(&a, method_weight, targets.len())?;
    let request = SearchRequest {
        teacher: a.teacher.clone(),
        data: spec,
        subset: a.subset.spec(),
        val_images: a.val_images,
        targets,
        config,
        method,
        out: a.out.clone(),
        command: shell_words::join(std::env::args()),
        sensitivities_from: None,
    };
    let bars = Bars::new();
    let outcome = request.run(device, &bars);
    bars.finish();
    let outcome = outcome?;
    if !gmpq::dist::is_main() {
        return Ok(()); // rank 0 reports
    }
    if a.json {
        // One JSON document on stdout, whether the policies were searched now or kept.
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "written": outcome.written, "kept": outcome.kept,
            }))?
        );
        return Ok(());
    }
    for path in &outcome.kept {
        println!(
            "{}: the same search finished here before, kept (delete it to search again)",
            path.display()
        );
    }
    for p in &outcome.written {
        println!("{}", p.one_line());
    }
    Ok(())
}

/// The search settings the flags state: the recipe's, then each flag that overrides one.
fn search_config(
    a: &SearchArgs,
    method_weight: Option<f64>,
    targets: usize,
) -> Result<SearchConfig> {
    let attribution_weight = match (method_weight, a.attribution_weight) {
        (Some(w), Some(given)) if given != w => bail!(
            "--method {} is the supernet search with attribution weight {w}: drop \
             --attribution-weight {given}, or use --method gmpq",
            a.method
        ),
        (Some(w), _) | (None, Some(w)) => w,
        (None, None) => SearchConfig::default().attribution_weight,
    };
    let config = SearchConfig {
        candidates: a.bits.candidates()?,
        epochs: a.epochs,
        warmup_epochs: if targets > 1 {
            a.warmup_epochs.unwrap_or(a.epochs / 3)
        } else {
            0
        },
        batch_size: a.batch_size,
        lr: a.lr,
        step_epochs: a.step_epochs,
        attribution_weight,
        p: a.p,
        complexity_weight: a.cd,
        attribution: a.attribution,
        augment: Augment {
            crop_padding: 2,
            hflip: a.hflip,
        },
        seed: a.seed,
        ..Default::default()
    };
    let mut config = config;
    a.recipe.apply(&mut config);
    if let Some(v) = a.alpha_lr {
        config.alpha_lr = v;
    }
    if let Some(v) = a.dual_rate {
        config.dual_rate = v;
    }
    if let Some(v) = a.alpha_optimizer {
        config.alpha_optimizer = v;
    }
    if let Some(v) = a.alpha_frozen_epochs {
        config.alpha_frozen_epochs = v;
    }
    if let Some(v) = a.budget_mode {
        config.budget_mode = v;
    }
    if let Some(v) = a.budget_penalty {
        anyhow::ensure!(
            v.is_finite() && v > 0.0,
            "--budget-penalty {v}: must be a positive number"
        );
        config.budget_penalty = v;
    }
    if let Some(t) = &a.temperature {
        let (start, end) = t
            .split_once(':')
            .and_then(|(s, e)| Some((s.parse::<f64>().ok()?, e.parse::<f64>().ok()?)))
            .filter(|(s, e)| *s > 0.0 && *e > 0.0)
            .with_context(|| {
                format!("--temperature {t}: expected START:END, both positive (e.g. 1:0.2)")
            })?;
        config.temperature = gmpq::search::TemperatureSchedule { start, end };
    }
    if let Some(v) = a.extraction {
        config.extraction = v;
    }
    Ok(config)
}

/// `gmpq extract --rank`: the ranked choice among a finished search's candidates.
fn rank_cmd(
    a: &ExtractArgs,
    searched: &std::path::Path,
    target: Option<search::Target>,
) -> Result<()> {
    let data = a.data.as_deref().context("--rank needs --data")?;
    let request = gmpq::search::RankRequest {
        searched: searched.to_path_buf(),
        teacher: a.teacher.clone(),
        data: super::commands::parse_spec(data)?,
        subset: a.subset.spec(),
        val_images: a.val_images,
        target,
        extra: a.also.clone(),
        out: a.out.clone().unwrap_or_else(|| {
            let name = target.map_or("search".to_string(), |t| t.to_string());
            searched
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(format!("policy-ranked-{name}.json"))
        }),
    };
    let (policy, record) = request.run(tch::Device::Cpu)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "policy": request.out, "ranking": record, "totals": policy.totals,
            }))?
        );
        return Ok(());
    }
    for (i, c) in record.candidates.iter().enumerate() {
        println!(
            "{} {:<40} {:>8.2}x  calibrated top-1 {:>6.2}%  log π(α) {:>8.2}",
            if i == record.chosen { "*" } else { " " },
            c.source,
            c.compression,
            c.val_top1,
            c.alpha_log_prob
        );
    }
    println!(
        "{}: kept candidate {} of {} (best calibrated top-1 on {} held-out proxy images)",
        request.out.display(),
        record.chosen + 1,
        record.candidates.len(),
        record.val_images
    );
    Ok(())
}

/// `gmpq extract`: a policy from a finished search's saved α, by another rule or budget.
pub fn extract_cmd(a: ExtractArgs) -> Result<()> {
    let path = if a.run.is_dir() {
        a.run.join("policy.json")
    } else {
        a.run.clone()
    };
    let searched = gmpq::policy::Policy::load(&path)?;
    let meta = search::PolicyMeta::of(&searched)
        .with_context(|| format!("{}: malformed meta", path.display()))?
        .with_context(|| format!("{}: no meta (not a gmpq search policy)", path.display()))?;
    // The geometry: recorded by gmpq search since this version; else the teacher's checkpoint.
    let model: gmpq::model::ModelConfig = match (&meta.model_config, &meta.teacher) {
        (Some(m), _) => m.clone(),
        (None, Some(teacher)) => {
            gmpq::checkpoint::Checkpoint::load(teacher)
                .with_context(|| {
                    format!(
                        "{}: reading the search's teacher for the model geometry",
                        path.display()
                    )
                })?
                .meta
                .model
        }
        (None, None) => bail!("{}: no meta.model_config or meta.teacher", path.display()),
    };
    let target = parse_target(
        a.budget.target_bops.as_deref(),
        a.budget.target_compression,
        a.budget.target_size_mb,
    )?;
    if a.rank {
        return rank_cmd(&a, &path, target);
    }
    // Policies written before the rule was recorded were extracted by argmax + repair.
    let rule: gmpq::search::ExtractionRule = match a.rule {
        Some(r) => r,
        None => meta
            .extraction_rule()
            .unwrap_or(gmpq::search::ExtractionRule::ArgmaxRepair),
    };
    let policy = search::re_extract(&searched, &model, rule, target)?;
    let target_name = search::PolicyMeta::of(&policy)
        .ok()
        .flatten()
        .and_then(|m| m.target)
        .map_or("none".to_string(), |t| t.to_string());
    let out = a.out.clone().unwrap_or_else(|| {
        path.parent()
            .unwrap_or(std::path::Path::new("."))
            .join(format!("policy-{rule}-{target_name}.json"))
    });
    policy.save(&out)?;
    let totals = policy.totals.clone().context("policy totals")?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "policy": out, "rule": rule.to_string(), "target": target_name, "totals": totals,
            }))?
        );
    } else {
        println!(
            "{}: {rule} under {target_name}: {:.4} G BOPs, compression {:.2}x, size {:.3} MB",
            out.display(),
            totals.bops as f64 / 1e9,
            totals.compression,
            totals.size_mb
        );
    }
    Ok(())
}

pub fn attribution_cmd(a: AttributionArgs, device: tch::Device) -> Result<()> {
    let mut checkpoints = vec![a.checkpoint.clone()];
    checkpoints.extend(a.compare.clone());
    let data = super::commands::parse_spec(&a.data)?;
    let n = gmpq::pipeline::attribution_grid(&checkpoints, &data, a.count, &a.out, device)?;
    println!(
        "wrote {} ({n} images × {} maps)",
        a.out.display(),
        checkpoints.len()
    );
    Ok(())
}
